"""AdapterHub's prefix-tuning and prompt-tuning folders without the oracle (``methods/prompt_hub*.py``).

- AdapterHub's conventions as deltatune computes them: a "from_zero" prefix is peft's prefix with the
  tokens numbered from 0; "embeddings" prompt tokens join the embeddings module's output (an independent
  hook here); sdpa equals eager with padding; generation with the cache equals generation without it;
  per-position labels skip the inserted tokens;
- exact round trips (``torch.equal``) through ``dt.save(format="adapters")`` and ``dt.load`` on BERT, GPT-2
  and LLaMA, flat, with the MLP and frozen, and the written config dicts and keys;
- AdapterHub's own ``.bin`` layout (the pool once per layer) loads like the safetensors file;
- every refusal, on load with the model bit-for-bit unchanged, on save with nothing written.

The oracle suite (tests/adapters_oracle/test_prompt_hub.py) compares with AdapterHub itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import deltatune as dt
from conftest import perturb_site_adapters, state_hash, tiny_t5
from prompt_inputs import inputs
from prompt_models import bert_seq, bert_tok, gpt2, llama

N = 3
MODELS: dict[str, Callable[..., nn.Module]] = {"bert": bert_seq, "gpt2": gpt2, "llama": llama}
SAFE, BIN, CONFIG = "adapter.safetensors", "pytorch_adapter.bin", "adapter_config.json"


def out(model: nn.Module, **extra: Any) -> Tensor:
    with torch.no_grad():
        return model(**{**inputs(), **extra}).logits


def prefix(arch: str, projection: bool = False, trainable: bool = True, attn: str = "sdpa", **extra: Any) -> nn.Module:
    model = MODELS[arch](attn)
    config = dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero", prefix_projection=projection,
                                   encoder_hidden_size=8, inference_mode=not trainable, **extra)
    dt.attach(model, config, "a")
    perturb_site_adapters(model, seed=3, scale=0.5)
    return model.eval()


def prompt(insert_at: str = "embeddings", attn: str = "sdpa", factory: Callable[..., nn.Module] = bert_seq,
           task_type: str | None = None) -> nn.Module:
    model = factory(attn)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, insert_at=insert_at, task_type=task_type), "a")
    perturb_site_adapters(model, seed=3, scale=0.5)
    return model.eval()


def saved(model: nn.Module, folder: Path) -> Path:
    dt.save(model, folder, format="adapters")
    return folder


# --------------------------------------------------------------------------- what the conventions compute


@pytest.mark.parametrize("arch", MODELS)
def test_from_zero_is_peft_prefix_with_tokens_numbered_from_zero(arch: str) -> None:
    ours = prefix(arch)
    peft_like = MODELS[arch]()
    dt.attach(peft_like, dt.PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8), "a")
    peft_like.load_state_dict(ours.state_dict())
    positions = torch.arange(7)[None].expand(2, -1)
    assert not torch.allclose(out(ours), out(peft_like), atol=1e-4)  # the numbering matters
    torch.testing.assert_close(out(ours), out(peft_like, position_ids=positions - N), rtol=0, atol=1e-6)


@pytest.mark.parametrize("insert_at", ["embeddings", "embeddings_after_first"])
def test_prompt_joins_the_embeddings_output(insert_at: str) -> None:
    """An independent reference: the same table spliced into the embeddings output by a plain hook, the mask
    lengthened by ones in front."""
    ours = prompt(insert_at)
    table = next(p for n, p in ours.named_parameters() if "site_adapters" in n).detach()
    reference = bert_seq()
    at = 1 if insert_at == "embeddings_after_first" else 0
    reference.bert.embeddings.register_forward_hook(
        lambda module, args, output: torch.cat([output[:, :at], table[None].expand(2, -1, -1), output[:, at:]], 1))
    mask = inputs()["attention_mask"]
    with torch.no_grad():
        expected = reference(input_ids=inputs()["input_ids"], attention_mask=torch.cat([torch.ones(2, N).long(), mask], 1)).logits
    torch.testing.assert_close(out(ours), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [lambda a: prefix("gpt2", attn=a), lambda a: prefix("llama", attn=a),
                                   lambda a: prefix("bert", attn=a), lambda a: prompt("embeddings", attn=a),
                                   lambda a: prompt("embeddings_after_first", attn=a)])
def test_sdpa_equals_eager_with_padding(build: Callable[[str], nn.Module]) -> None:
    torch.testing.assert_close(out(build("sdpa")), out(build("eager")), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_with_cache_equals_without(arch: str) -> None:
    model = prefix(arch)
    ids = inputs(pad=False)["input_ids"]
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_token_labels_skip_the_inserted_tokens() -> None:
    model = prompt("embeddings_after_first", factory=bert_tok, task_type="TOKEN_CLS")
    labels = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        result = model(**inputs(pad=False), labels=labels)
    kept = torch.cat([result.logits[:, :1], result.logits[:, 1 + N:]], 1)  # the first token, then the others
    expected = nn.functional.cross_entropy(kept.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(result.loss, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- exact round trips


FULL_PREFIX = {"architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
               "encoder_prefix": True, "flat": True, "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh",
               "prefix_length": N, "shared_gating": True, "use_gating": False}
"""What adapters 1.3's save_adapter writes for PrefixTuningConfig(prefix_length=3, flat=True)."""
POOL = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("form", ["flat", "mlp", "frozen"])
def test_prefix_round_trip_is_exact(arch: str, form: str, tmp_path: Path) -> None:
    ours = prefix(arch, projection=form == "mlp", trainable=form != "frozen")
    folder = saved(ours, tmp_path / "a")
    data = json.loads((folder / CONFIG).read_text())
    as_mlp = form == "mlp" and arch != "llama"  # LLaMA's grouped-query prefix MLP is narrower than AdapterHub's
    assert data["config"] == {**FULL_PREFIX, **({"flat": False, "bottleneck_size": 8} if as_mlp else {})}
    assert data["name"] == "a" and data["version"] == "adapters.1.3.0"
    pool = f"{POOL[arch]}prefix_tuning.prefix_tunings.a.self_prefix."
    locals_ = ["control_trans.0.bias", "control_trans.0.weight", "control_trans.2.bias", "control_trans.2.weight",
               "wte.weight"] if as_mlp else ["control_trans"]
    assert sorted(load_file(folder / SAFE)) == [pool + k for k in locals_]
    back = MODELS[arch]()
    dt.load(back, folder, name="a", trainable=form != "frozen")
    assert torch.equal(out(back), out(ours))
    trained = dt.trainable_parameters(back)[0]
    if form == "frozen":
        assert trained == 0
    else:  # the same parameters, or for LLaMA's MLP the table it computes (layers * 2 * key/value width per token)
        assert trained == (dt.trainable_parameters(ours)[0] if as_mlp or form == "flat" else N * 2 * 2 * 16)


@pytest.mark.parametrize("insert_at, combine", [("embeddings", "prefix"), ("embeddings_after_first", "prefix_after_bos")])
def test_prompt_round_trip_is_exact(insert_at: str, combine: str, tmp_path: Path) -> None:
    ours = prompt(insert_at)
    folder = saved(ours, tmp_path / "a")
    assert json.loads((folder / CONFIG).read_text())["config"] == {
        "architecture": "prompt_tuning", "combine": combine, "init_weights_seed": None, "prompt_init": "random_uniform",
        "prompt_init_text": None, "prompt_length": N}
    assert list(load_file(folder / SAFE)) == ["bert.prompt_tuning.prompt_tunings.a.prompt_embedding.weight"]
    for trainable in (False, True):
        back = bert_seq()
        dt.load(back, folder, name="a", trainable=trainable)
        assert torch.equal(out(back), out(ours))


def test_trained_classifier_travels_in_the_head_files(tmp_path: Path) -> None:
    ours = bert_seq()
    dt.attach(ours, dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero", task_type="SEQ_CLS"), "a")
    perturb_site_adapters(ours, seed=3, scale=0.5)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "classifier" in name and param.requires_grad:
                param.add_(1.0)
    folder = saved(ours, tmp_path / "a")
    assert (folder / "head_config.json").is_file()
    back = bert_seq()
    dt.load(back, folder, name="a")
    assert torch.equal(out(back), out(ours))


def _as_adapterhub_bin(folder: Path, arch: str, layers: int = 2) -> None:
    """Rewrite ``folder``'s weights as AdapterHub's save_adapter does: a .bin with the pool once more per layer."""
    tensors = load_file(folder / SAFE)
    layer = {"bert": "bert.encoder.layer.{}.attention.self.", "gpt2": "transformer.h.{}.attn.",
             "llama": "model.layers.{}.self_attn."}[arch]
    copies = dict(tensors)
    for key, value in tensors.items():
        local = key.split("prefix_tuning.", 1)[1].replace("prefix_tunings.", "pool.prefix_tunings.", 1)
        copies.update({layer.format(i) + "prefix_tuning." + local: value for i in range(layers)})
    torch.save(copies, folder / BIN)
    (folder / SAFE).unlink()


@pytest.mark.parametrize("arch", MODELS)
def test_adapterhub_bin_with_per_layer_copies_loads(arch: str, tmp_path: Path) -> None:
    ours = prefix(arch, projection=True)
    folder = saved(ours, tmp_path / "a")
    _as_adapterhub_bin(folder, arch)
    back = MODELS[arch]()
    dt.load(back, folder, name="a")
    torch.testing.assert_close(out(back), out(ours), rtol=0, atol=1e-6)


def test_peft_configs_write_no_adapterhub_field() -> None:
    assert "token_positions" not in dt.PrefixTuningConfig(num_virtual_tokens=N).to_peft_dict()
    assert "insert_at" not in dt.PromptTuningConfig(num_virtual_tokens=N).to_peft_dict()


# --------------------------------------------------------------------------- refusals


def _edit(folder: Path, **config: Any) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data["config"].update(config)
    (folder / CONFIG).write_text(json.dumps(data))


def _edit_tensors(folder: Path, change: Callable[[dict[str, Tensor]], None]) -> None:
    tensors = dict(load_file(folder / SAFE))
    change(tensors)
    save_file(tensors, folder / SAFE)


def _refused(folder: Path, match: str, arch: str = "gpt2", trainable: bool = False, error: type = dt.AdapterFileError,
             factory: Callable[[], nn.Module] | None = None) -> None:
    """``dt.load`` raises ``error`` matching ``match`` and leaves a model holding another adapter unchanged."""
    model = factory() if factory is not None else MODELS[arch]()
    dt.attach(model, dt.LoraConfig(r=2), "other")
    before, modules = state_hash(model), [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        dt.load(model, folder, name="a", trainable=trainable)
    assert state_hash(model) == before and [n for n, _ in model.named_modules()] == modules
    assert dt.adapter_names(model) == ["other"]


PREFIX_REFUSALS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "gate": ({"use_gating": True}, r"use_gating=True: .*per-layer gate", False),
    "leave_out": ({"leave_out": [1]}, r"leave_out=\[1\]: .*every attention layer", False),
    "dropout_trainable": ({"dropout": 0.1}, r"dropout=0.1: .*load it frozen", True),
    "bad_length": ({"prefix_length": 0}, r"prefix_length=0 must be a positive integer", False),
    "other_length": ({"prefix_length": N + 1}, r"has shape .* needs", False),
    "flat_flag": ({"flat": "yes"}, r"flat='yes' must be true or false", False),
}


@pytest.mark.parametrize("case", PREFIX_REFUSALS)
def test_prefix_config_refusals(case: str, tmp_path: Path) -> None:
    folder = saved(prefix("gpt2"), tmp_path / "a")
    change, match, trainable = PREFIX_REFUSALS[case]
    _edit(folder, **change)
    _refused(folder, match, trainable=trainable)


def test_frozen_load_takes_dropout_and_any_activation(tmp_path: Path) -> None:
    """Dropout changes training only; a frozen MLP's output is computed once, with the file's activation."""
    ours = prefix("gpt2", projection=True)
    folder = saved(ours, tmp_path / "a")
    _edit(folder, dropout=0.1, non_linearity="ReLU")
    back = gpt2()
    dt.load(back, folder, name="a")
    tensors = load_file(folder / SAFE)
    pool = "transformer.prefix_tuning.prefix_tunings.a.self_prefix."
    inner = torch.relu(tensors[pool + "wte.weight"] @ tensors[pool + "control_trans.0.weight"].T
                       + tensors[pool + "control_trans.0.bias"])
    table = inner @ tensors[pool + "control_trans.2.weight"].T + tensors[pool + "control_trans.2.bias"]
    loaded = next(p for n, p in back.named_parameters() if "site_adapters" in n)
    torch.testing.assert_close(loaded, table, rtol=0, atol=1e-6)
    _edit(folder, dropout=0.0)
    _refused(folder, r"non_linearity='ReLU': .*tanh", trainable=True)
    _edit(folder, non_linearity="swishy")
    _refused(folder, r"non_linearity='swishy': deltatune does not know")


def test_trainable_mlp_of_grouped_query_attention_is_refused(tmp_path: Path) -> None:
    folder = saved(prefix("gpt2", projection=True), tmp_path / "a")
    _edit_tensors(folder, lambda t: t.update({k.replace("transformer.", "model."): t.pop(k) for k in list(t)}))
    data = json.loads((folder / CONFIG).read_text())
    data["model_type"] = "llama"
    (folder / CONFIG).write_text(json.dumps(data))
    _refused(folder, r"shape", arch="llama")  # a GPT-2 MLP: its widths are not LLaMA's
    ours = prefix("llama", projection=True)
    mlp_folder = tmp_path / "llama"
    saved(ours, mlp_folder)  # written flat (see test_prefix_round_trip_is_exact); make it an MLP of AdapterHub's widths
    pool = "model.prefix_tuning.prefix_tunings.a.self_prefix."
    width = 2 * 2 * 16  # layers * 2 * (2 key/value heads * head_dim 8)
    mlp = {pool + "wte.weight": torch.randn(N, 32), pool + "control_trans.0.weight": torch.randn(8, 32),
           pool + "control_trans.0.bias": torch.randn(8), pool + "control_trans.2.weight": torch.randn(width, 8),
           pool + "control_trans.2.bias": torch.randn(width)}
    save_file(mlp, mlp_folder / SAFE)
    _edit(mlp_folder, flat=False, bottleneck_size=8)
    _refused(mlp_folder, r"grouped-query attention.*load it frozen", arch="llama", trainable=True)
    dt.load(llama(), mlp_folder, name="a")  # frozen: the table is computed


def test_key_refusals(tmp_path: Path) -> None:
    folder = saved(prefix("gpt2"), tmp_path / "a")
    pool = "transformer.prefix_tuning.prefix_tunings.a.self_prefix.control_trans"
    value = load_file(folder / SAFE)[pool]
    _edit_tensors(folder, lambda t: t.update({"transformer.h.0.attn.prefix_tuning.prefix_gates.a.weight": torch.ones(1, 32)}))
    _refused(folder, r"prefix_gates.a.weight' is not one of adapter 'a'")
    _edit_tensors(folder, lambda t: t.clear() or t.update({pool.replace("self_prefix", "cross_prefix"): value}))
    _refused(folder, r"AdapterHub's 'cross_prefix'")
    _edit_tensors(folder, lambda t: t.clear() or t.update({pool.replace(".a.", ".b."): value}))
    _refused(folder, r"is not one of adapter 'a'")
    _edit_tensors(folder, lambda t: t.clear() or t.update({pool: value, "transformer.h.1.attn.prefix_tuning.pool."
                                                           "prefix_tunings.a.self_prefix.control_trans": value + 1}))
    _refused(folder, r"copies of one pool tensor and must be equal")
    _edit(folder, flat=False, bottleneck_size=8)
    _edit_tensors(folder, lambda t: t.clear() or t.update({pool.replace("control_trans", "wte.weight"): torch.ones(N, 32)}))
    _refused(folder, r"missing tensor\(s\) \['control_trans.0.weight'")


@pytest.mark.filterwarnings("ignore:.*is loaded into a")
def test_prompt_refusals(tmp_path: Path) -> None:
    folder = saved(prompt(), tmp_path / "a")
    _refused(folder, r"GPT2LMHeadModel has no embeddings module", error=dt.AdapterError)
    _edit(folder, combine="suffix")
    _refused(folder, r"combine='suffix' is none of AdapterHub's", factory=bert_seq)


@pytest.mark.filterwarnings("ignore:.*is loaded into a")
def test_encoder_decoder_prefix_is_refused(tmp_path: Path) -> None:
    folder = saved(prefix("gpt2"), tmp_path / "a")
    _refused(folder, r"encoder_prefix=True: .*encoder-decoder", factory=tiny_t5)


def test_saves_that_adapterhub_would_read_differently_are_refused(tmp_path: Path) -> None:
    peft_prefix = gpt2()
    dt.attach(peft_prefix, dt.PrefixTuningConfig(num_virtual_tokens=N), "a")
    with pytest.raises(dt.AdapterFileError, match=r"token_positions='after_prefix' is peft's convention.*format='peft'"):
        dt.save(peft_prefix, tmp_path / "p", format="adapters")
    peft_prompt = bert_seq()
    dt.attach(peft_prompt, dt.PromptTuningConfig(num_virtual_tokens=N), "a")
    with pytest.raises(dt.AdapterFileError, match=r"insert_at='input' is peft's convention"):
        dt.save(peft_prompt, tmp_path / "q", format="adapters")
    for model, field in ((prefix("gpt2"), "token_positions"), (prompt(), "insert_at")):
        with pytest.raises(dt.AdapterFileError, match=rf"in peft's format: \{{'{field}'.*format='adapters'"):
            dt.save(model, tmp_path / "r")
    assert not any(tmp_path.iterdir())
    mixed = gpt2()  # a peft-format adapter saved alongside a refused one: nothing is written
    dt.attach(mixed, dt.PrefixTuningConfig(num_virtual_tokens=N), "peft_one")
    dt.attach(mixed, dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero"), "hub_one")
    with pytest.raises(dt.AdapterFileError, match="token_positions"):
        dt.save(mixed, tmp_path / "s", names=["peft_one", "hub_one"])
    assert not any(tmp_path.iterdir())


def test_conventions_cannot_mix_in_one_batch() -> None:
    model = gpt2()
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N, token_positions="from_zero"), "hub")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N), "peft")
    with pytest.raises(dt.AdapterError, match="different places"):
        dt.set_active(model, dt.BatchSplit("hub", "peft", sizes=[1, 1]))
