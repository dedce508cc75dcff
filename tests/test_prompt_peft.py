"""Prompt tuning and P-tuning against the real ``peft`` package, and their library behaviours.

Seeding torch identically right before ``peft.get_peft_model`` and ``dt.attach`` gives bit-identical
prompt encoders (same construction order and initialisation), so every parity check compares the
two libraries on the same numbers:

- forward: logits within 1e-5 (fp32) for PROMPT_TUNING (RANDOM, SAMPLE_VOCAB, TEXT) and P_TUNING
  (MLP, LSTM) on GPT-2, LLaMA with grouped-query attention, BERT (sequence and token
  classification, with token type ids), T5; left and right padding; eager and sdpa attention;
- ``generate``: greedy and seeded sampling, 20 new tokens, left-padded batch, with the cache;
- question answering without token type ids (peft's QA call drops them; deltatune keeps them);
- files: the same safetensors keys and shapes, the same adapter_config.json keys (peft adds
  ``peft_version``, as in test_peft_parity) and values, each library loads the other's folder.

Then deltatune's own behaviours with prompt adapters: disabling, refused merges, parameter counts,
gradients, two prompt adapters over the rows of a batch, a prompt adapter summed with LoRA,
positional calls, gradient checkpointing, a bf16 base, and dt.save / dt.load round trips.
peft is a test oracle only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import TOLERANCES, state_hash
from prompt_models import (FP32_ATOL, LABELS, MODELS, N, QA, WIDTH, batch, config_json, file_shapes, labels_for, llama,
                           logits, max_diff, perturb_trainable, seeded_pair)
from task_fixtures import word_tokenizer

import peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft reads a deprecated flag

INIT_TEXT = "a1 b2 a3"
"""TEXT initialisation: three words of the test tokenizer, repeated to N virtual tokens."""

# --------------------------------------------------------------------------- methods

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "pt-random": ("PromptTuningConfig", {}),
    "pt-sample-vocab": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "pt-text": ("PromptTuningConfig", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": INIT_TEXT}),
    "p-mlp": ("PromptEncoderConfig", {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 24}),
    "p-lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12,
                                       "encoder_num_layers": 3}),
}
"""Method id -> (the config class name both libraries share, its kwargs)."""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer folder for TEXT initialisation (ids below every model's vocabulary)."""
    folder = tmp_path_factory.mktemp("prompt-tokenizer")
    word_tokenizer(folder, "encoder")
    return folder


def configs(method: str, task: str, tokenizer: Path | None = None) -> tuple[Any, Any]:
    """(peft's config, deltatune's) for ``method`` on ``task``."""
    cls, kwargs = METHODS[method]
    kwargs = {"task_type": task, "num_virtual_tokens": N, **kwargs}
    if kwargs.get("prompt_tuning_init") == "TEXT":
        assert tokenizer is not None
        kwargs["tokenizer_name_or_path"] = str(tokenizer)
    return getattr(peft, cls)(**kwargs), getattr(dt, cls)(**kwargs)


def pair(model: str, method: str, attn: str = "sdpa", tokenizer: Path | None = None, seed: int = 7
         ) -> tuple[nn.Module, nn.Module]:
    """(peft's model, deltatune's) for ``method`` on a fresh tiny ``model``, from the same seed."""
    factory, task = (MODELS | QA)[model]
    return seeded_pair(factory, *configs(method, task, tokenizer), attn, seed)


def adapted_part(model: str, out: Tensor) -> Tensor:
    """The positions of a decoder-only or token-classification output that the real tokens own."""
    return out[:, N:] if model in ("gpt2", "llama", "bert-token-cls") else out


def assert_changes_base(model: str, out: Tensor, inputs: dict[str, Tensor]) -> None:
    """The prompt changes the output: otherwise a parity check would prove nothing."""
    base = logits(MODELS[model][0]("sdpa"), inputs)
    assert adapted_part(model, out).shape == base.shape
    assert max_diff(adapted_part(model, out), base) > 1e-3, "the prompt does not change the output"


# --------------------------------------------------------------------------- forward parity

ATTN = {("pt-random", "gpt2"): "eager", ("pt-sample-vocab", "llama"): "eager",
        ("pt-text", "bert-seq-cls"): "eager", ("p-mlp", "bert-token-cls"): "eager", ("p-lstm", "t5"): "eager",
        ("p-mlp", "gpt2"): "eager", ("p-lstm", "llama"): "eager", ("pt-random", "bert-seq-cls"): "eager",
        ("pt-sample-vocab", "bert-token-cls"): "eager", ("pt-text", "t5"): "eager"}
"""Method x model cases that also run with eager attention (sdpa for all): every model and every
method twice, to keep the suite fast."""

FORWARD = [pytest.param(m, k, "sdpa", id=f"{m}-{k}-sdpa") for m in METHODS for k in MODELS] + [
    pytest.param(m, k, attn, id=f"{m}-{k}-{attn}") for (m, k), attn in ATTN.items()]


@pytest.mark.parametrize(("method", "model", "attn"), FORWARD)
def test_forward_matches_peft(method: str, model: str, attn: str, tokenizer_dir: Path) -> None:
    theirs, ours = pair(model, method, attn, tokenizer_dir)
    assert ours.config._attn_implementation == attn
    for padding in ("left", "right"):
        inputs = batch(model, padding)
        want, got = logits(theirs, inputs), logits(ours, inputs)
        assert got.shape == want.shape
        assert max_diff(got, want) <= FP32_ATOL, f"{padding} padding: max abs diff {max_diff(got, want):.3g}"
    assert_changes_base(model, got, inputs)
    if model != "bert-token-cls":  # peft's TOKEN_CLS call crashes with labels (test below)
        with torch.no_grad():
            theirs_loss, ours_loss = (side(**inputs, labels=labels_for(model, inputs)).loss for side in (theirs, ours))
        assert abs(ours_loss.item() - theirs_loss.item()) <= FP32_ATOL


def test_text_init_copies_the_text_embeddings(tokenizer_dir: Path) -> None:
    """TEXT: the virtual tokens start as the embeddings of the text's ids, repeated to N."""
    _, ours = pair("llama", "pt-text", tokenizer=tokenizer_dir)
    ids = word_tokenizer(tokenizer_dir, "encoder")(INIT_TEXT)["input_ids"]
    ids = (ids * N)[:N]
    table = ours.site_adapters["default"].embedding.weight
    assert torch.equal(table, ours.get_input_embeddings().weight[ids])


def test_sample_vocab_init_copies_vocabulary_rows() -> None:
    _, ours = pair("gpt2", "pt-sample-vocab")
    table, vocab = table_of(ours), ours.get_input_embeddings().weight
    assert all(any(torch.equal(row, word) for word in vocab) for row in table)


def test_token_classification_loss_covers_real_tokens_only() -> None:
    """Our TOKEN_CLS call takes labels (extended with -100 over the virtual tokens; peft's call
    crashes there): the loss is the cross-entropy of the real tokens' logits."""
    _, ours = pair("bert-token-cls", "pt-random")
    inputs = batch("bert-token-cls", "right")
    labels = torch.randint(0, LABELS, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = ours(**inputs, labels=labels)
    assert out.logits.shape == (2, N + 8, LABELS)
    manual = F.cross_entropy(out.logits[:, N:].reshape(-1, LABELS), labels.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - manual.item()) <= 1e-6


@pytest.mark.parametrize("method", ["pt-random", "p-mlp"])
def test_question_answering_matches_peft_without_token_types(method: str) -> None:
    """Start and end logits equal peft's for a call without token type ids. (With them they differ:
    peft's QA call never passes its ``token_type_ids`` argument on, deltatune extends it with zeros.)"""
    theirs, ours = pair("bert-qa", method)
    for padding in ("left", "right"):
        inputs = {k: v for k, v in batch("bert-qa", padding).items() if k != "token_type_ids"}
        with torch.no_grad():
            want, got = theirs(**inputs), ours(**inputs)
        assert got.start_logits.shape == want.start_logits.shape == (2, N + 8)
        assert max_diff(got.start_logits, want.start_logits) <= FP32_ATOL
        assert max_diff(got.end_logits, want.end_logits) <= FP32_ATOL


def test_question_answering_positions_and_token_types() -> None:
    """Our QA call: token type ids get zeros over the virtual tokens (the hand-made reference), and
    start/end positions move past them, so the loss scores the positions the labels name."""
    ours = prompted("pt-random", "bert-qa")
    inputs = batch("bert-qa", "right")
    starts, ends = torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        out = ours(**inputs, start_positions=starts, end_positions=ends)
        embeds = torch.cat([table_of(ours)[None].expand(2, -1, -1), ours.get_input_embeddings()(inputs["input_ids"])], 1)
        hidden = ours.bert(inputs_embeds=embeds, attention_mask=F.pad(inputs["attention_mask"], (N, 0), value=1),
                           token_type_ids=F.pad(inputs["token_type_ids"], (N, 0), value=0))[0]  # no hook on .bert
        ref_start = ours.qa_outputs(hidden)[..., 0]
    assert max_diff(out.start_logits, ref_start) <= FP32_ATOL
    want = (F.cross_entropy(out.start_logits, starts + N) + F.cross_entropy(out.end_logits, ends + N)) / 2
    assert abs(out.loss.item() - want.item()) <= 1e-6


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("method", ["pt-random", "p-lstm"])
@pytest.mark.parametrize("model", ["gpt2", "llama", "t5"])
def test_generate_matches_peft(model: str, method: str) -> None:
    """Greedy and seeded sampling, 20 new tokens each, on a left-padded batch, with the cache; ours
    also without the cache (every step recomputes the whole prompted sequence)."""
    theirs, ours = pair(model, method)
    inputs = {k: v for k, v in batch(model, "left").items() if k != "decoder_input_ids"}
    options: dict[str, Any] = {"max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": 0}
    new = 21 if model == "t5" else inputs["input_ids"].shape[1] + 20  # T5 starts with the decoder start token
    with torch.no_grad():
        want = theirs.generate(**inputs, **options, do_sample=False)
        got = ours.generate(**inputs, **options, do_sample=False)
        uncached = ours.generate(**inputs, **options, do_sample=False, use_cache=False)
        sampled = []
        for side in (theirs, ours):
            torch.manual_seed(11)
            sampled.append(side.generate(**inputs, **options, do_sample=True, top_k=0, temperature=2.0))
    assert want.shape == (2, new)
    assert torch.equal(got, want)
    assert torch.equal(uncached, want)
    assert sampled[0].shape == (2, new)
    assert torch.equal(sampled[1], sampled[0])
    assert not torch.equal(sampled[0], want), "sampling drew the greedy tokens: the check would prove nothing"


# --------------------------------------------------------------------------- files


Saved = Callable[[str, str], tuple[Path, Path, Tensor, Tensor]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """``saved(model, method)``: (peft's folder, ours, peft's logits, ours) for perturbed adapters, made once."""
    cache: dict[tuple[str, str], tuple[Path, Path, Tensor, Tensor]] = {}

    def get(model: str, method: str) -> tuple[Path, Path, Tensor, Tensor]:
        if (model, method) not in cache:
            theirs, ours = pair(model, method)
            perturb_trainable(theirs, 1)
            perturb_trainable(ours, 2)
            folder = tmp_path_factory.mktemp(f"{model}-{method}")
            theirs.save_pretrained(folder / "peft")
            dt.save(ours, folder / "dt")
            inputs = batch(model, "left")
            cache[model, method] = folder / "peft", folder / "dt", logits(theirs, inputs), logits(ours, inputs)
        return cache[model, method]

    return get


LOAD_CASES = [pytest.param(k, m, id=f"{k}-{m}") for k in ("gpt2", "bert-seq-cls", "t5")
              for m in ("pt-random", "p-mlp", "p-lstm")]
CONFIG_CASES = [pytest.param(k, m, id=f"{k}-{m}")
                for k in ("gpt2", "bert-seq-cls", "t5") for m in ("pt-random", "p-mlp", "p-lstm")]


@pytest.mark.parametrize(("model", "method"), LOAD_CASES)
def test_safetensors_layout_matches_peft(model: str, method: str, saved: Saved, tmp_path: Path) -> None:
    """Same keys and shapes as peft's file, for a fresh adapter and for peft's re-saved by us (values too)."""
    peft_dir, dt_dir, _, _ = saved(model, method)
    assert file_shapes(dt_dir) == file_shapes(peft_dir)
    dt.save(dt.load(MODELS[model][0]("sdpa"), peft_dir), tmp_path)
    resaved, original = (load_file(f / "adapter_model.safetensors") for f in (tmp_path, peft_dir))
    assert resaved.keys() == original.keys()
    assert all(torch.equal(resaved[k], original[k]) for k in original)


@pytest.mark.parametrize(("model", "method"), CONFIG_CASES)
def test_config_json_matches_peft(model: str, method: str, saved: Saved) -> None:
    peft_dir, dt_dir, _, _ = saved(model, method)
    ours, theirs = config_json(dt_dir), config_json(peft_dir)
    assert set(ours) == set(theirs) - {"peft_version"}
    # peft adds a task's heads to modules_to_save twice for prompt methods; the set is what counts
    heads = [set(c.pop("modules_to_save") or ()) for c in (ours, theirs)]
    assert heads[0] == heads[1]
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


@pytest.mark.parametrize(("model", "method"), LOAD_CASES)
def test_peft_loads_ours(model: str, method: str, saved: Saved) -> None:
    _, dt_dir, theirs_out, ours_out = saved(model, method)
    assert max_diff(theirs_out, ours_out) > 1e-3  # different adapters: a load that kept the wrong one would show
    loaded = peft.PeftModel.from_pretrained(MODELS[model][0]("sdpa"), dt_dir).eval()
    assert max_diff(logits(loaded, batch(model, "left")), ours_out) <= FP32_ATOL


@pytest.mark.parametrize(("model", "method"), LOAD_CASES)
def test_we_load_peft(model: str, method: str, saved: Saved) -> None:
    peft_dir, _, theirs_out, _ = saved(model, method)
    loaded = dt.load(MODELS[model][0]("sdpa"), peft_dir).eval()
    assert max_diff(logits(loaded, batch(model, "left")), theirs_out) <= FP32_ATOL


# --------------------------------------------------------------------------- library behaviours


def prompted(method: str = "pt-random", model: str = "llama", name: str = "default", seed: int = 7,
             target: nn.Module | None = None) -> nn.Module:
    """deltatune's adapter ``name`` on ``target`` (default: a fresh tiny ``model``)."""
    factory, task = (MODELS | QA)[model]
    target = factory("sdpa") if target is None else target
    torch.manual_seed(seed)
    return dt.attach(target, configs(method, task)[1], name=name).eval()


def manual_prompt(model: nn.Module, table: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """What a prompt adapter computes, by hand: ``table`` before the token embeddings, the mask
    extended with ones, no position ids (a causal LM numbers the longer sequence itself)."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    rows = embeds.shape[0]
    embeds = torch.cat([table[None].expand(rows, -1, -1).to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([torch.ones(rows, table.shape[0], dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=mask).logits.float()


def table_of(model: nn.Module, name: str = "default") -> Tensor:
    """Adapter ``name``'s virtual tokens (its encoder's output), (N, width)."""
    with torch.no_grad():
        return model.site_adapters[name].table().detach().clone()


def test_manual_prompt_reference() -> None:
    """The reference the composition tests use (hand-made inputs_embeds) agrees with the adapter."""
    model = prompted("p-mlp")
    inputs = batch("llama")
    table = table_of(model)
    with dt.disabled(model):
        want = manual_prompt(model, table, inputs)
    assert max_diff(logits(model, inputs), want) <= FP32_ATOL


@pytest.mark.parametrize(("method", "model"), [("p-lstm", "llama"), ("pt-random", "bert-seq-cls"), ("p-mlp", "t5")])
def test_disabled_gives_the_base_output(method: str, model: str) -> None:
    """Inside dt.disabled: exactly the base model (no virtual tokens, the original task head)."""
    ours = prompted(method, model)
    inputs = batch(model)
    base = logits(MODELS[model][0]("sdpa"), inputs)
    with dt.disabled(ours):
        assert torch.equal(logits(ours, inputs), base)
    assert max_diff(adapted_part(model, logits(ours, inputs)), base) > 1e-3  # back on after the block


@pytest.mark.parametrize("action", ["merge", "unload"])
def test_merge_and_unload_refuse(action: str) -> None:
    model = prompted("pt-random", "bert-seq-cls")
    inputs = batch("bert-seq-cls")
    before, out = state_hash(model), logits(model, inputs)
    with pytest.raises(dt.AdapterError, match="no weight to fold them into"):
        dt.merge(model) if action == "merge" else dt.unload(model, merge=True)
    assert state_hash(model) == before
    assert torch.equal(logits(model, inputs), out)
    assert dt.adapter_names(model) == ["default"]


def lstm_params(width: int, hidden: int, layers: int) -> int:
    """A bidirectional LSTM: per layer and direction 4 gates of (input + hidden) weights and two biases."""
    return sum(2 * (4 * hidden * ((width if layer == 0 else 2 * hidden) + hidden) + 8 * hidden)
               for layer in range(layers))


@pytest.mark.parametrize(("method", "model", "expected"), [
    pytest.param("pt-random", "llama", N * WIDTH, id="pt-llama"),
    pytest.param("pt-random", "bert-seq-cls", N * WIDTH + WIDTH * LABELS + LABELS, id="pt-bert-seq-cls"),
    pytest.param("p-mlp", "gpt2", N * WIDTH + (WIDTH * 24 + 24) + (24 * 24 + 24) + (24 * WIDTH + WIDTH),
                 id="p-mlp-gpt2"),
    pytest.param("p-lstm", "llama", N * WIDTH + lstm_params(WIDTH, 12, 3) + (24 * 24 + 24) + (24 * WIDTH + WIDTH),
                 id="p-lstm-llama"),
    pytest.param("pt-random", "t5", 2 * N * WIDTH, id="pt-t5"),  # a table per transformer stack
])
def test_trainable_parameter_count(method: str, model: str, expected: int) -> None:
    theirs, ours = pair(model, method)
    assert dt.trainable_parameters(ours)[0] == expected
    assert dt.adapter_parameters(ours, "default") == expected
    assert theirs.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize(("method", "model"), [("p-lstm", "llama"), ("pt-random", "bert-seq-cls")])
def test_gradients_reach_only_the_adapter(method: str, model: str) -> None:
    ours = prompted(method, model).train()
    inputs = batch(model)
    if model == "llama":
        loss = ours(**inputs, labels=inputs["input_ids"]).loss
    else:
        loss = ours(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(n.startswith("site_adapters.default.") or ".copies.default." in n for n in trainable), trainable
    assert any(n.startswith("site_adapters.default.") for n in trainable)
    assert all(ours.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def two_prompts(method: str = "pt-random") -> nn.Module:
    model = prompted(method, "llama", "p", seed=7)
    return prompted(method, "llama", "q", seed=8, target=model)


def test_batch_split_gives_each_row_its_prompt() -> None:
    model = two_prompts()
    inputs = batch("llama")
    dt.set_active(model, "p")
    p_out = logits(model, inputs)
    dt.set_active(model, "q")
    q_out = logits(model, inputs)
    assert max_diff(p_out, q_out) > 1e-3
    dt.set_active(model, dt.BatchSplit("p", "q", sizes=[1, 1]))
    split = logits(model, inputs)
    assert max_diff(split[0], p_out[0]) <= FP32_ATOL
    assert max_diff(split[1], q_out[1]) <= FP32_ATOL


def test_batch_split_generate() -> None:
    """Generation under a BatchSplit: row 0 continues as with p alone, row 1 as with q alone."""
    model = two_prompts()
    inputs = batch("llama")
    options: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        alone = {}
        for name in ("p", "q"):
            dt.set_active(model, name)
            alone[name] = model.generate(**inputs, **options)
        dt.set_active(model, dt.BatchSplit("p", "q", sizes=[1, 1]))
        split = model.generate(**inputs, **options)
    assert torch.equal(split[0], alone["p"][0])
    assert torch.equal(split[1], alone["q"][1])


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_parallel_gives_each_copy_its_prompt(model: str) -> None:
    """Parallel(p, q) repeats the batch: the first copy gets p's output, the second q's."""
    ours = prompted("pt-random", model, "p", seed=7)
    prompted("pt-random", model, "q", seed=8, target=ours)
    inputs = batch(model)
    alone = {}
    for name in ("p", "q"):
        dt.set_active(ours, name)
        alone[name] = logits(ours, inputs)
    dt.set_active(ours, dt.Parallel("p", "q"))
    both = logits(ours, inputs)
    assert both.shape[0] == 4
    assert max_diff(both[:2], alone["p"]) <= FP32_ATOL
    assert max_diff(both[2:], alone["q"]) <= FP32_ATOL


@pytest.mark.parametrize("composition", [["p", "q"], dt.Average("p", "q"), dt.Stack("p", "q")],
                         ids=["sum", "average", "stack"])
def test_two_prompts_on_one_row_are_refused_and_change_nothing(composition: object) -> None:
    model = two_prompts()
    dt.set_active(model, "p")
    inputs = batch("llama")
    before = logits(model, inputs)
    with pytest.raises(dt.AdapterError, match="every row must take exactly one of the adapters"):
        dt.set_active(model, composition)  # type: ignore[arg-type]
    assert dt.active_adapters(model) == ("p",)
    assert torch.equal(logits(model, inputs), before)


def test_a_row_without_a_prompt_is_refused() -> None:
    """One prompt adapter under a BatchSplit would otherwise put its tokens into every row."""
    model = prompted("pt-random", "llama", "p")
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), name="l")
    with pytest.raises(dt.AdapterError, match="every row must take exactly one"):
        dt.set_active(model, dt.BatchSplit("p", "l", sizes=[1, 1]))


def test_prompts_of_different_shapes_are_refused_before_anything_changes() -> None:
    model = prompted("pt-random", "llama", "p")
    dt.attach(model, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N + 2), name="q")
    inputs = batch("llama")
    before = logits(model, inputs)
    with pytest.raises(dt.AdapterError, match="different numbers or widths"):
        dt.set_active(model, dt.BatchSplit("p", "q", sizes=[1, 1]))
    assert torch.equal(logits(model, inputs), before)


def test_prompt_summed_with_lora() -> None:
    """Sum(prompt, LoRA): the LoRA model with the prompt's virtual tokens in front (checked by hand)."""
    model = prompted("p-mlp", "llama", "p")
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), name="l")
    model.eval()
    inputs = batch("llama")
    dt.set_active(model, "p")
    prompt_only = logits(model, inputs)
    dt.set_active(model, "l")
    lora_only = logits(model, inputs)
    want = manual_prompt(model, table_of(model, "p"), inputs)  # LoRA active, virtual tokens by hand
    dt.set_active(model, dt.Sum("p", "l"))
    got = logits(model, inputs)
    assert max_diff(got, want) <= FP32_ATOL
    assert max_diff(got, prompt_only) > 1e-3
    assert max_diff(got[:, N:], lora_only) > 1e-3


@pytest.mark.parametrize("model", ["llama", "bert-seq-cls", "t5"])
def test_positional_arguments(model: str) -> None:
    ours = prompted("pt-random", model)
    inputs = batch(model)
    want = logits(ours, inputs)
    with torch.no_grad():
        only_ids = ours(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"}).logits
        both = ours(inputs["input_ids"], inputs["attention_mask"],
                    **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}).logits
    assert torch.equal(only_ids, want)
    assert torch.equal(both, want)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", ["pt-random", "p-lstm"])
def test_gradient_checkpointing_gives_the_same_gradients(method: str, reentrant: bool) -> None:
    """In train mode; reentrant checkpointing is what deltatune's trainer enables."""
    inputs = batch("llama")

    def grads(checkpointing: bool) -> dict[str, Tensor]:
        model = prompted(method, "llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("method", ["pt-random", "p-mlp"])
def test_bf16_base_runs_like_peft(method: str) -> None:
    """A bf16 base: the fp32 prompts are cast to the embeddings' dtype, as peft does (same output)."""
    theirs, ours = pair("llama", method)
    theirs.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    inputs = batch("llama")
    with torch.no_grad():
        got = ours(**inputs).logits
        want = theirs(**inputs).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), **TOLERANCES[torch.bfloat16])
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_bf16_adapter_on_bf16_base_runs() -> None:
    """The whole model in bf16, adapter included (prompts already in the base dtype)."""
    model = prompted("p-lstm", "llama").to(torch.bfloat16)
    with torch.no_grad():
        out = model(**batch("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- dt.save / dt.load


@pytest.mark.parametrize("method", ["p-mlp", "p-lstm"])
def test_p_tuning_round_trip_loads_frozen(method: str, tmp_path: Path) -> None:
    ours = prompted(method, "llama")
    perturb_trainable(ours, 3)
    inputs = batch("llama")
    want = logits(ours, inputs)
    dt.save(ours, tmp_path)
    assert file_shapes(tmp_path) == {"prompt_embeddings": (N, WIDTH)}
    loaded = dt.load(llama("sdpa"), tmp_path)
    assert dt.trainable_parameters(loaded)[0] == 0
    assert max_diff(logits(loaded, inputs), want) <= 1e-6


def test_save_in_train_mode_writes_the_eval_prompts(tmp_path: Path) -> None:
    """A checkpoint saved mid-training holds the virtual tokens the trained model gives in eval mode."""
    model = llama("sdpa")
    torch.manual_seed(3)
    dt.attach(model, dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_dropout=0.5,
                                            encoder_reparameterization_type="LSTM", encoder_num_layers=2))
    model.train()
    dt.save(model, tmp_path)
    assert model.training and model.site_adapters["default"].training  # saving leaves the mode alone
    model.eval()
    inputs = batch("llama")
    assert max_diff(logits(dt.load(llama("sdpa"), tmp_path), inputs), logits(model, inputs)) <= 1e-6


def test_prompt_tuning_round_trip_loads_trainable(tmp_path: Path) -> None:
    ours = prompted("pt-random", "llama")
    inputs = batch("llama")
    want = logits(ours, inputs)
    dt.save(ours, tmp_path)
    loaded = dt.load(llama("sdpa"), tmp_path, trainable=True)
    assert dt.trainable_parameters(loaded)[0] == N * WIDTH
    assert torch.equal(logits(loaded, inputs), want)


def saved_p_tuning(folder: Path) -> Path:
    dt.save(prompted("p-mlp", "llama"), folder)
    return folder


def test_p_tuning_file_refuses_to_load_trainable(tmp_path: Path) -> None:
    """The file holds the encoder's output, not the encoder: it cannot be trained on as P-tuning.
    The load refuses and leaves the model unchanged."""
    folder = saved_p_tuning(tmp_path)
    model = llama("sdpa")
    before = state_hash(model)
    with pytest.raises(dt.DeltatuneError):  # today an AdapterFileError about an unexpected 'prompt_embeddings'
        dt.load(model, folder, trainable=True)
    assert state_hash(model) == before
    assert not hasattr(model, "site_adapters")


def test_p_tuning_load_error_says_why(tmp_path: Path) -> None:
    folder = saved_p_tuning(tmp_path)  # (the message holds the path: the pattern avoids words of the test's name)
    with pytest.raises(dt.DeltatuneError, match=r"P_TUNING adapter.s file holds what its trained encoder computed.*load it frozen"):
        dt.load(llama("sdpa"), folder, trainable=True)
