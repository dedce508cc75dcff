"""Prefix tuning against the real ``peft`` package, and its library behaviours.

Seeding torch identically right before ``peft.get_peft_model`` and ``dt.attach`` gives bit-identical
prefix encoders (same construction order and initialisation), so every parity check compares the
two libraries on the same numbers. Every case runs without the projection (the prefixes themselves
trained: P-tuning v2) and with it (an MLP of a non-default ``encoder_hidden_size``):

- forward: within 1e-5 (fp32) on GPT-2, LLaMA with grouped-query attention (prefixes sized for
  the key/value heads), BERT sequence classification (token type ids), BERT token classification
  and question answering (peft computes those heads itself from the backbone: logits and losses
  compared), T5; left and right padding; eager and sdpa; explicit position ids (both libraries add
  the prefix length), T5's decoder attention mask (lengthened); ``init_weights="zero"``;
- ``generate``: greedy and seeded sampling, 20 new tokens, left-padded batch, with the cache;
- files: the same safetensors keys and shapes (with the projection, the computed prefixes), the
  same adapter_config.json keys and values, each library loads the other's folder.

Then deltatune's own behaviours: disabling, refused merges, parameter counts, gradients, gradient
checkpointing (refused in training), two prefix adapters over the rows of a batch, a prompt-tuning
adapter summed with a prefix adapter, a bf16 base, loading frozen or trainable, and training.
peft is a test oracle only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import TOLERANCES, state_hash
from prompt_models import (FP32_ATOL, LABELS, MODELS, N, QA, WIDTH, batch, config_json, file_shapes, llama, logits,
                           max_diff, perturb_trainable, seeded_pair)

import peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft reads a deprecated flag

HIDDEN = 24
"""encoder_hidden_size of the projection (the default would be token_dim)."""
LAYERS = 2
"""Transformer layers of every tiny model (per stack for T5)."""
TOKEN_DIM = {"gpt2": WIDTH, "llama": 8 * 2, "bert-seq-cls": WIDTH, "bert-token-cls": WIDTH, "bert-qa": WIDTH,
             "t5": WIDTH}
"""Width of one key (or value) prefix per layer: the hidden size, or for LLaMA's grouped-query
attention head_dim (32 / 4 heads) times its 2 key/value heads, as peft sizes it."""
PROJECTION = [pytest.param(False, id="plain"), pytest.param(True, id="projected")]



# --------------------------------------------------------------------------- models


def configs(task: str, projection: bool, **extra: Any) -> tuple[Any, Any]:
    """(peft's PrefixTuningConfig, deltatune's) for ``task``."""
    kwargs: dict[str, Any] = {"task_type": task, "num_virtual_tokens": N, "prefix_projection": projection, **extra}
    if projection:
        kwargs["encoder_hidden_size"] = HIDDEN
    return peft.PrefixTuningConfig(**kwargs), dt.PrefixTuningConfig(**kwargs)


def pair(model: str, projection: bool, attn: str = "sdpa", seed: int = 7, **extra: Any
         ) -> tuple[nn.Module, nn.Module]:
    """(peft's model, deltatune's) with a prefix adapter on a fresh tiny ``model``, from the same seed."""
    factory, task = (MODELS | QA)[model]
    return seeded_pair(factory, *configs(task, projection, **extra), attn, seed)


def prefixed(model: str = "llama", projection: bool = False, name: str = "default", seed: int = 7,
             target: nn.Module | None = None) -> nn.Module:
    """deltatune's prefix adapter ``name`` on ``target`` (default: a fresh tiny ``model``)."""
    factory, task = (MODELS | QA)[model]
    target = factory("sdpa") if target is None else target
    torch.manual_seed(seed)
    return dt.attach(target, configs(task, projection)[1], name=name).eval()


def base_model(model: str) -> nn.Module:
    return (MODELS | QA)[model][0]("sdpa")


def table_of(model: nn.Module, name: str = "default") -> Tensor:
    """Adapter ``name``'s prefixes as evaluation computes them, (N, layers * 2 * token_dim)."""
    with torch.no_grad():
        return model.site_adapters[name].table().detach().clone()


# --------------------------------------------------------------------------- inputs


def labels_of(model: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The label arguments of ``model``'s task, padding ignored."""
    mask = inputs["attention_mask"]
    if model in ("gpt2", "llama"):
        return {"labels": inputs["input_ids"].masked_fill(mask == 0, -100)}
    if model == "t5":
        return {"labels": inputs["decoder_input_ids"]}
    if model == "bert-seq-cls":
        return {"labels": torch.tensor([0, 2])}
    if model == "bert-token-cls":
        labels = torch.randint(0, LABELS, mask.shape, generator=torch.Generator().manual_seed(3))
        return {"labels": labels.masked_fill(mask == 0, -100)}
    return {"start_positions": torch.tensor([1, 5]), "end_positions": torch.tensor([3, 6])}


def variants(model: str, padding: str) -> list[dict[str, Tensor]]:
    """The calls a forward check makes: the batch, and with explicit position ids (numbered over the
    real tokens: not what the model would compute) or, for T5, a decoder attention mask."""
    inputs = batch(model, padding)
    if model == "bert-qa":  # peft's QA call drops token type ids and position ids: compare without
        del inputs["token_type_ids"]
        return [inputs]
    if model == "t5":
        decoder_mask = torch.ones_like(inputs["decoder_input_ids"])
        decoder_mask[1, -2:] = 0
        return [inputs, {**inputs, "decoder_attention_mask": decoder_mask}]
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return [inputs, {**inputs, "position_ids": positions}]


def outputs(model: nn.Module, inputs: dict[str, Tensor]) -> list[Tensor]:
    """The output tensors a check compares: logits (start and end logits for QA), then the loss."""
    with torch.no_grad():
        out = model(**inputs)
    heads = [out.start_logits, out.end_logits] if hasattr(out, "start_logits") else [out.logits]
    return [t.float() for t in heads] + ([out.loss.float()] if out.loss is not None else [])


# --------------------------------------------------------------------------- forward parity

EAGER = {"gpt2": False, "llama": True, "bert-seq-cls": False, "bert-token-cls": True, "t5": False, "bert-qa": True}
"""Every model also runs with eager attention, with one of the two encoders (sdpa runs with both)."""
FORWARD_MODELS = [*MODELS, "bert-qa"]
FORWARD = [pytest.param(k, p, "sdpa", id=f"{k}-{'projected' if p else 'plain'}-sdpa")
           for k in FORWARD_MODELS for p in (False, True)] + [
    pytest.param(k, p, "eager", id=f"{k}-{'projected' if p else 'plain'}-eager") for k, p in EAGER.items()]


@pytest.mark.parametrize(("model", "projection", "attn"), FORWARD)
def test_forward_matches_peft(model: str, projection: bool, attn: str) -> None:
    theirs, ours = pair(model, projection, attn)
    assert ours.config._attn_implementation == attn
    for padding in ("left", "right"):
        calls = variants(model, padding)
        for inputs in calls:
            inputs = {**inputs, **labels_of(model, inputs)}
            want, got = outputs(theirs, inputs), outputs(ours, inputs)
            assert len(got) == len(want) == (3 if model == "bert-qa" else 2)  # the loss too
            for a, b in zip(got, want):
                assert a.shape == b.shape
                assert max_diff(a, b) <= FP32_ATOL, f"{padding} padding, {sorted(inputs)}: {max_diff(a, b):.3g}"
        if padding == "left" and len(calls) > 1:  # the extra argument reaches the model (BERT's small
            # position embeddings move its ~0.01 logits by ~4e-5: far above their fp32 roundoff, ~1e-9)
            assert max_diff(outputs(ours, calls[0])[0], outputs(ours, calls[1])[0]) > 1e-6
    inputs = calls[0]
    base = outputs(base_model(model), inputs)[0]
    assert max_diff(outputs(ours, inputs)[0], base) > 1e-3, "the prefix does not change the output"


@pytest.mark.parametrize("projection", PROJECTION)
def test_zero_init_matches_peft(projection: bool) -> None:
    """init_weights="zero": the table (or the projection's last layer) starts at zero, as in peft;
    zero keys and values still take attention weight, so the output differs from the base."""
    theirs, ours = pair("llama", projection, init_weights="zero")
    inputs = batch("llama")
    assert torch.equal(table_of(ours), torch.zeros(N, LAYERS * 2 * TOKEN_DIM["llama"]))
    assert max_diff(logits(ours, inputs), logits(theirs, inputs)) <= FP32_ATOL
    assert max_diff(logits(ours, inputs), logits(llama(), inputs)) > 1e-4
    if projection:  # only the last layer is zero: the projection still trains
        assert ours.site_adapters["default"].transform[0].weight.abs().sum() > 0


# --------------------------------------------------------------------------- generate


def prompt_inputs(model: str) -> dict[str, Tensor]:
    return {k: v for k, v in batch(model, "left").items() if k != "decoder_input_ids"}


OPTIONS: dict[str, Any] = {"max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": 0}


@pytest.mark.parametrize("projection", PROJECTION)
@pytest.mark.parametrize("model", ["gpt2", "llama", "t5"])
def test_generate_matches_peft(model: str, projection: bool) -> None:
    """Greedy and seeded sampling, 20 new tokens each, on a left-padded batch, with the cache."""
    theirs, ours = pair(model, projection)
    inputs = prompt_inputs(model)
    new = 21 if model == "t5" else inputs["input_ids"].shape[1] + 20  # T5 starts with the decoder start token
    with torch.no_grad():
        want = theirs.generate(**inputs, **OPTIONS, do_sample=False)
        got = ours.generate(**inputs, **OPTIONS, do_sample=False)
        sampled = []
        for side in (theirs, ours):
            torch.manual_seed(11)
            sampled.append(side.generate(**inputs, **OPTIONS, do_sample=True, top_k=0, temperature=2.0))
        with dt.disabled(ours):
            plain = ours.generate(**inputs, **OPTIONS, do_sample=False)
    assert want.shape == (2, new)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain), "the prefix does not change the continuation"
    assert sampled[0].shape == (2, new)
    assert torch.equal(sampled[1], sampled[0])
    assert not torch.equal(sampled[0], want), "sampling drew the greedy tokens: the check would prove nothing"


@pytest.mark.parametrize("model", ["gpt2", "llama", "t5"])
def test_generate_without_cache_matches_cached(model: str) -> None:
    """use_cache=False: every step recomputes the whole sequence with fresh prefixes (peft's
    prefix generation crashes there, so ours is checked against ours with the cache)."""
    ours = prefixed(model)
    inputs = prompt_inputs(model)
    with torch.no_grad():
        cached = ours.generate(**inputs, **OPTIONS, do_sample=False)
        uncached = ours.generate(**inputs, **OPTIONS, do_sample=False, use_cache=False)
    assert torch.equal(uncached, cached)


# --------------------------------------------------------------------------- files

FILE_MODELS = ["gpt2", "llama", "bert-seq-cls", "t5"]
FILE_CASES = [pytest.param(k, p, id=f"{k}-{'projected' if p else 'plain'}") for k in FILE_MODELS for p in (False, True)]


class SavedPair:
    """A perturbed adapter pair saved by both libraries: the folders, their outputs on the left-padded
    batch, and each library's prefix table (what its file should hold)."""

    def __init__(self, folder: Path, model: str, projection: bool) -> None:
        theirs, ours = pair(model, projection)
        perturb_trainable(theirs, 1)
        perturb_trainable(ours, 2)
        self.peft_dir, self.dt_dir = folder / "peft", folder / "dt"
        theirs.save_pretrained(self.peft_dir)
        dt.save(ours, self.dt_dir)
        inputs = batch(model, "left")
        self.theirs_out, self.ours_out = logits(theirs, inputs), logits(ours, inputs)
        with torch.no_grad():
            self.theirs_table = theirs.get_prompt_embedding_to_save("default").detach().clone()
        self.ours_table = table_of(ours)


Saved = Callable[[str, bool], SavedPair]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """``saved(model, projection)``, made once per module."""
    cache: dict[tuple[str, bool], SavedPair] = {}

    def get(model: str, projection: bool) -> SavedPair:
        if (model, projection) not in cache:
            cache[model, projection] = SavedPair(tmp_path_factory.mktemp(f"{model}-{projection}"), model, projection)
        return cache[model, projection]

    return get


@pytest.mark.parametrize(("model", "projection"), FILE_CASES)
def test_safetensors_layout_matches_peft(model: str, projection: bool, saved: Saved, tmp_path: Path) -> None:
    """One tensor, ``prompt_embeddings`` (N, layers * 2 * token_dim): the prefixes themselves, the
    projection's output when there is one, in both libraries' files; peft's re-saved by us is unchanged."""
    files = saved(model, projection)
    width = LAYERS * 2 * TOKEN_DIM[model]
    head = {"base_model.classifier.weight": (LABELS, WIDTH), "base_model.classifier.bias": (LABELS,)}
    assert file_shapes(files.dt_dir) == file_shapes(files.peft_dir) == {
        "prompt_embeddings": (N, width), **(head if model == "bert-seq-cls" else {})}
    ours_file, theirs_file = (load_file(f / "adapter_model.safetensors")["prompt_embeddings"]
                              for f in (files.dt_dir, files.peft_dir))
    assert torch.equal(ours_file, files.ours_table)
    assert torch.equal(theirs_file, files.theirs_table)
    dt.save(dt.load(base_model(model), files.peft_dir), tmp_path)
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"], theirs_file)


@pytest.mark.parametrize(("model", "projection"), FILE_CASES)
def test_config_json_matches_peft(model: str, projection: bool, saved: Saved) -> None:
    files = saved(model, projection)
    ours, theirs = config_json(files.dt_dir), config_json(files.peft_dir)
    assert set(ours) == set(theirs) - {"peft_version"}
    # peft adds a task's heads to modules_to_save twice for prompt methods; the set is what counts
    heads = [set(c.pop("modules_to_save") or ()) for c in (ours, theirs)]
    assert heads[0] == heads[1]
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert ours["prefix_projection"] is projection
    assert ours["token_dim"] == TOKEN_DIM[model]


@pytest.mark.parametrize(("model", "projection"), FILE_CASES)
def test_peft_loads_ours(model: str, projection: bool, saved: Saved) -> None:
    files = saved(model, projection)
    assert max_diff(files.theirs_out, files.ours_out) > 1e-3  # different adapters: a load that kept the wrong one shows
    loaded = peft.PeftModel.from_pretrained(base_model(model), files.dt_dir).eval()
    assert max_diff(logits(loaded, batch(model, "left")), files.ours_out) <= FP32_ATOL


@pytest.mark.parametrize(("model", "projection"), FILE_CASES)
def test_we_load_peft(model: str, projection: bool, saved: Saved) -> None:
    files = saved(model, projection)
    loaded = dt.load(base_model(model), files.peft_dir).eval()
    assert dt.trainable_parameters(loaded)[0] == 0
    assert max_diff(logits(loaded, batch(model, "left")), files.theirs_out) <= FP32_ATOL


def test_projected_file_refuses_to_load_trainable(saved: Saved) -> None:
    """The file holds the projection's output, not the projection: the load refuses, says why and
    that the file loads frozen, and leaves the model unchanged."""
    model = llama()
    before = state_hash(model)
    with pytest.raises(dt.AdapterFileError,
                       match=r"PREFIX_TUNING adapter.s file holds what its trained encoder computed.*load it frozen"):
        dt.load(model, saved("llama", True).dt_dir, trainable=True)
    assert state_hash(model) == before
    assert not hasattr(model, "site_adapters")


def test_plain_file_loads_trainable_and_trains(saved: Saved) -> None:
    """Without projection the file holds the trained table itself: it loads trainable, with the
    saved outputs, and trains on."""
    files = saved("llama", False)
    model = dt.load(llama(), files.dt_dir, trainable=True)
    assert dt.trainable_parameters(model)[0] == N * LAYERS * 2 * TOKEN_DIM["llama"]
    inputs = batch("llama")
    assert torch.equal(logits(model.eval(), inputs), files.ours_out)
    losses = train(model, inputs, steps=3)
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- library behaviours


@pytest.mark.parametrize(("model", "projection"), [("llama", True), ("bert-seq-cls", False), ("t5", True)])
def test_disabled_gives_the_base_output(model: str, projection: bool) -> None:
    """Inside dt.disabled: exactly the base model (no prefixes, the original task head)."""
    ours = prefixed(model, projection)
    inputs = batch(model)
    base = logits(base_model(model), inputs)
    with dt.disabled(ours):
        assert torch.equal(logits(ours, inputs), base)
    assert max_diff(logits(ours, inputs), base) > 1e-3  # back on after the block


@pytest.mark.parametrize("action", ["merge", "unload"])
def test_merge_and_unload_refuse(action: str) -> None:
    model = prefixed("bert-seq-cls", True)
    inputs = batch("bert-seq-cls")
    before, out = state_hash(model), logits(model, inputs)
    with pytest.raises(dt.AdapterError, match="no weight to fold them into"):
        dt.merge(model) if action == "merge" else dt.unload(model, merge=True)
    assert state_hash(model) == before
    assert torch.equal(logits(model, inputs), out)
    assert dt.adapter_names(model) == ["default"]


def prefix_params(model: str, projection: bool) -> int:
    """No projection: the table, n * L * 2 * D; with it: an n x D table, a D -> h linear, a
    h -> L * 2 * D linear (weights and biases). D: TOKEN_DIM, h: HIDDEN."""
    d, out = TOKEN_DIM[model], LAYERS * 2 * TOKEN_DIM[model]
    if not projection:
        return N * out
    return N * d + (d * HIDDEN + HIDDEN) + (HIDDEN * out + out)


@pytest.mark.parametrize(("model", "projection", "head"), [
    pytest.param("llama", False, 0, id="llama-plain"),
    pytest.param("llama", True, 0, id="llama-projected"),
    pytest.param("bert-seq-cls", False, WIDTH * LABELS + LABELS, id="bert-seq-cls-plain"),  # the head copy
    pytest.param("t5", True, 0, id="t5-projected"),
])
def test_trainable_parameter_count(model: str, projection: bool, head: int) -> None:
    theirs, ours = pair(model, projection)
    expected = prefix_params(model, projection) + head
    assert dt.trainable_parameters(ours)[0] == expected
    assert dt.adapter_parameters(ours, "default") == expected
    assert theirs.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize(("model", "projection"), [("llama", True), ("bert-seq-cls", False)])
def test_gradients_reach_only_the_adapter(model: str, projection: bool) -> None:
    ours = prefixed(model, projection).train()
    inputs = batch(model)
    ours(**inputs, **labels_of(model, inputs)).loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(n.startswith("site_adapters.default.") or ".copies.default." in n for n in trainable), trainable
    assert any(n.startswith("site_adapters.default.") for n in trainable)
    assert any(".copies.default." in n for n in trainable) == (model == "bert-seq-cls")
    assert all(ours.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_refused_in_training(reentrant: bool) -> None:
    """Training with checkpointing would add each recomputed layer's prefix to the cache twice: the
    call refuses and says so; in eval mode (no recomputation) checkpointing changes nothing."""
    model = prefixed("llama", True)
    inputs = batch("llama")
    want = logits(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert torch.equal(logits(model.eval(), inputs), want)
    model.train()
    with pytest.raises(dt.AdapterError, match=r"cannot train with gradient checkpointing.*prefix to the cache twice"
                                              r".*gradient_checkpointing_disable"):
        model(**inputs, labels=inputs["input_ids"])
    model.gradient_checkpointing_disable()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # and trains once it is off


def two_prefixes() -> nn.Module:
    """Adapters p (no projection) and q (projection) on one LLaMA: tables of the same width."""
    model = prefixed("llama", False, "p", seed=7)
    return prefixed("llama", True, "q", seed=8, target=model)


def test_batch_split_gives_each_row_its_prefix() -> None:
    """BatchSplit(p, q): row 0 as with p alone, row 1 as with q alone, in a forward and in generate."""
    model = two_prefixes()
    inputs = batch("llama")
    options: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    alone = {}
    with torch.no_grad():
        for name in ("p", "q"):
            dt.set_active(model, name)
            alone[name] = logits(model, inputs), model.generate(**inputs, **options)
        dt.set_active(model, dt.BatchSplit("p", "q", sizes=[1, 1]))
        split, generated = logits(model, inputs), model.generate(**inputs, **options)
    assert max_diff(alone["p"][0], alone["q"][0]) > 1e-3
    assert max_diff(split[0], alone["p"][0][0]) <= FP32_ATOL
    assert max_diff(split[1], alone["q"][0][1]) <= FP32_ATOL
    assert torch.equal(generated[0], alone["p"][1][0])
    assert torch.equal(generated[1], alone["q"][1][1])


PROMPT_TOKENS = 3
"""Virtual tokens of the prompt-tuning adapter summed with a prefix adapter (not N: the two differ)."""


@pytest.mark.parametrize("prefix_first", [
    pytest.param(False, id="prompt-attached-first"),
    pytest.param(True, id="prefix-attached-first"),
])
def test_prompt_summed_with_prefix(prefix_first: bool) -> None:
    """Sum(prompt, prefix): the prompt's virtual tokens before the input (given by hand as
    inputs_embeds, with only the prefix active) and the prefixes in every layer, whichever adapter
    was attached first; different from each alone; generation continues the same way."""
    model = llama()
    order = ["x", "p"] if prefix_first else ["p", "x"]
    for name in order:
        torch.manual_seed(7 if name == "p" else 8)
        config = (dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS) if name == "p"
                  else configs("CAUSAL_LM", True)[1])
        dt.attach(model, config, name=name)
    model.eval()
    inputs = batch("llama")
    options: dict[str, Any] = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    alone = {}
    for name in ("p", "x"):
        dt.set_active(model, name)
        alone[name] = logits(model, inputs)
    # the reference: only the prefix adapter active, the prompt's tokens as inputs_embeds
    embeds = torch.cat([table_of(model, "p")[None].expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
    by_hand = {"inputs_embeds": embeds.detach(),
               "attention_mask": torch.cat([torch.ones(2, PROMPT_TOKENS, dtype=torch.long), inputs["attention_mask"]], 1)}
    with torch.no_grad():
        want = model(**by_hand).logits
        want_tokens = model.generate(**by_hand, **options)  # the new tokens only (inputs_embeds)
    dt.set_active(model, dt.Sum("p", "x"))
    got = logits(model, inputs)
    with torch.no_grad():
        generated = model.generate(**inputs, **options)
    assert got.shape == (2, PROMPT_TOKENS + 8, 128)
    assert max_diff(got, want) <= FP32_ATOL
    assert max_diff(got, alone["p"]) > 1e-3
    assert max_diff(got[:, PROMPT_TOKENS:], alone["x"]) > 1e-3
    assert torch.equal(generated[:, 8:], want_tokens)


@pytest.mark.parametrize("projection", PROJECTION)
def test_bf16_base_runs_like_peft(projection: bool) -> None:
    """Attached to a bf16 base: the prefixes are cast to the model's dtype, as peft does; it trains."""
    factory, task = MODELS["llama"]
    theirs_config, ours_config = configs(task, projection)
    base = factory("sdpa").to(torch.bfloat16)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(base, theirs_config).eval()
    ours = factory("sdpa").to(torch.bfloat16)
    torch.manual_seed(7)
    dt.attach(ours, ours_config).eval()
    inputs = batch("llama")
    with torch.no_grad():
        got, want = ours(**inputs).logits, theirs(**inputs).logits
        generated = ours.generate(**prompt_inputs("llama"), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), **TOLERANCES[torch.bfloat16])
    assert generated.shape == (2, 12)
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("projection", PROJECTION)
def test_round_trip_loads_frozen(projection: bool, tmp_path: Path) -> None:
    ours = prefixed("llama", projection)
    perturb_trainable(ours, 3)
    inputs = batch("llama")
    want = logits(ours, inputs)
    dt.save(ours, tmp_path)
    loaded = dt.load(llama(), tmp_path)
    assert dt.trainable_parameters(loaded)[0] == 0
    assert max_diff(logits(loaded, inputs), want) <= 1e-6


# --------------------------------------------------------------------------- training


def train(model: nn.Module, inputs: dict[str, Tensor], steps: int) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) on one batch; the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return losses


@pytest.mark.parametrize("projection", PROJECTION)
def test_training_reduces_the_loss(projection: bool) -> None:
    model = prefixed("llama", projection)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, batch("llama"), steps=8)
    # the tiny random LLaMA starts near ln(128) = 4.85; measured drops over 8 steps: 0.018 (plain), 0.083 (projected)
    assert all(after < before for before, after in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_prefixed_model_is_freed_when_dropped() -> None:
    """The prefix hook holds no reference to its model (the hook registry is keyed weakly by it)."""
    import gc
    import weakref

    model = prefixed("llama")
    with torch.no_grad():
        model(**batch("llama"))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_decoder_classifier_with_prefix_and_prompt_reads_each_rows_last_token() -> None:
    """Both sites on a LLaMA classifier: the prefix lengthens the mask, not the hidden states, so the
    head must still find each row's own last token (a short row alone == batched with a long one)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=100, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    torch.manual_seed(1)
    dt.attach(model, dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N), name="pfx")
    dt.attach(model, dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), name="pt")
    dt.set_active(model, ["pfx", "pt"])
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11, 12, 13]])
    batched_ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    mask = (batched_ids != 0).long()
    with torch.no_grad():
        alone = model(input_ids=short, attention_mask=torch.ones_like(short)).logits
        together = model(input_ids=batched_ids, attention_mask=mask).logits
        last = model(input_ids=long, attention_mask=torch.ones_like(long)).logits
    assert max_diff(together[:1], alone) <= 1e-5 and max_diff(together[1:], last) <= 1e-5
