"""X-LoRA against peft's XLoraModel (eval mode) on a tiny LLaMA with LoRA experts saved by peft
(random non-zero B): logits and scalings equal, classifier save/load, what trains, what is refused.
peft is only imported here, as a test oracle.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import perturb, state_hash, tiny_llama, token_ids
from deltatune.errors import AdapterError, AdapterFileError, ConfigError, DeltatuneError, TargetError
from deltatune.methods.xlora_recipe import experts as recipe_experts

import peft

EXPERT_TARGETS = (["q_proj", "v_proj"], ["q_proj", "down_proj"], ["o_proj"])


def no_cache_llama() -> nn.Module:
    model = tiny_llama()
    model.config.use_cache = False  # peft's X-LoRA refuses a model that caches
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three peft LoRA experts (ranks 2, 3, 4; different targets) in folders named "0", "1", "2"
    (peft 0.21.2's X-LoRA works only when the expert names are their indices)."""
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for i, targets in enumerate(EXPERT_TARGETS):
        config = peft.LoraConfig(r=2 + i, lora_alpha=4 + i, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(tiny_llama(seed=10 + i), config).save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    return paths


def pair(experts: dict[str, str], **fields: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, peft's X-LoRA model, ours) with the same classifier weights."""
    base = no_cache_llama()
    settings = {"hidden_size": 32, "adapters": experts, "xlora_size": 8, **fields}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.XLoraConfig(task_type="CAUSAL_LM", **settings)).eval()
    ours = dt.attach(copy.deepcopy(base), dt.XLoraConfig(**settings), name="xl").eval()
    classifier = theirs.base_model.internal_xlora_classifier
    ours_part = ours.deltatune_state.model_deltas["xl"]
    ours_part.classifier.load_state_dict(classifier.state_dict())
    return base, theirs, ours


CASES = [
    {"layerwise_scalings": True},
    {"layerwise_scalings": False},
    {"layerwise_scalings": True, "top_k_lora": 1},
    {"layerwise_scalings": False, "top_k_lora": 1},
    {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False, "xlora_depth": 2, "scaling_pass_value": 0.5},
    {"layerwise_scalings": True, "xlora_depth": 3, "softmax_temperature": 0.7, "global_scaling_weight": 0.6,
     "scaling_pass_value": 0.3},
]


@pytest.mark.parametrize("fields", CASES)
def test_logits_and_scalings_equal_peft(experts: dict[str, str], fields: dict[str, Any]) -> None:
    base, theirs, ours = pair(experts, **fields)
    ids = token_ids(2, 6)
    with torch.no_grad():
        expected, got, plain = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, base(ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the experts change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    scalings = ours.deltatune_state.model_deltas["xl"].scalings
    torch.testing.assert_close(scalings, theirs.base_model.internal_xlora_scalings, rtol=1e-6, atol=1e-6)
    assert scalings.shape == (2, 6, 8, 3)  # 8 adapted modules (q, v, o, down in 2 layers), 3 experts


def test_generate_equals_peft(experts: dict[str, str]) -> None:
    _, theirs, ours = pair(experts, layerwise_scalings=True, top_k_lora=2)
    ids = token_ids(1, 4)
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False), expected)


def test_disabled_is_the_base_exactly(experts: dict[str, str]) -> None:
    base, _, ours = pair(experts, layerwise_scalings=True)
    ids = token_ids(2, 5)
    with torch.no_grad(), dt.disabled(ours):
        assert torch.equal(ours(ids).logits, base(ids).logits)
    with torch.no_grad():
        assert not torch.equal(ours(ids).logits, base(ids).logits)


@pytest.mark.parametrize("trainable", [False, True])
def test_training_updates_only_the_classifier(experts: dict[str, str], trainable: bool) -> None:
    _, _, ours = pair(experts, use_trainable_adapters=trainable, layerwise_scalings=True)
    part = ours.deltatune_state.model_deltas["xl"]
    before = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ids = token_ids(2, 6)
    ours.train()
    ours(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    classifier = {k for k in changed if ".classifier." in k}
    expert_keys = {k for k in changed if ".experts." in k}
    assert classifier and changed == classifier | expert_keys
    assert bool(expert_keys) == trainable
    assert all(not p.requires_grad for n, p in ours.named_parameters() if n.startswith(("model.", "lm_head.")))
    assert part.classifier.layers[0].weight.requires_grad
    statistics = part.take_statistics()  # what the trainer logs: mean scaling per expert (softmax: sums to 1)
    assert sum(statistics[f"xl/expert_load_{e}"] for e in range(3)) == pytest.approx(1.0, abs=1e-5)
    assert 0 < statistics["xl/router_entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6
    assert part.take_statistics() == {} and part.take_loss() is None


def test_save_and_load_both_ways(experts: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's config and the classifier under peft's state keys, the experts copied into the folder
    and named by paths relative to it: peft loads our folder from inside it (it reads relative paths
    from the working directory). peft 0.21.2 saves X-LoRA's classifier as an empty tensor file, so
    its own folders carry no classifier: loading one is refused, not filled with a random classifier."""
    _, theirs, ours = pair(experts, layerwise_scalings=True, top_k_lora=2)
    dt.save(ours, tmp_path / "x", names=["xl"])
    loaded = dt.load(no_cache_llama(), tmp_path / "x" / "xl", name="xl")  # a named adapter's subfolder
    ids = token_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    monkeypatch.chdir(tmp_path / "x" / "xl")
    in_peft = peft.PeftModel.from_pretrained(no_cache_llama(), ".").eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    monkeypatch.chdir(tmp_path)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterFileError, match="missing tensor"):
        dt.load(no_cache_llama(), tmp_path / "peft")
    saved_keys = set(loaded.deltatune_state.model_deltas["xl"].tensors())
    assert saved_keys == {f"base_model.internal_xlora_classifier.{k}"
                          for k in theirs.base_model.internal_xlora_classifier.state_dict()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("trainable", [False, True])
def test_a_saved_adapter_carries_its_experts_and_loads_anywhere(experts: dict[str, str], tmp_path: Path,
                                                                trainable: bool) -> None:
    """The save copies every expert's two files into the folder and names them relatively: the folder,
    copied elsewhere with the experts and the first save deleted, loads and computes the same, twice."""
    sources = tmp_path / "experts"
    shutil.copytree(Path(experts["0"]).parent, sources)
    own = {name: str(sources / name) for name in experts}
    model = dt.attach(no_cache_llama(), dt.XLoraConfig(adapters=own, xlora_size=8, layerwise_scalings=True,
                                                       use_trainable_adapters=trainable)).eval()
    perturb(model)
    ids = token_ids(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    dt.save(model, tmp_path / "saved")
    saved = _files(tmp_path / "saved")
    config = json.loads(saved["adapter_config.json"])
    assert config["adapters"] == {name: f"xlora_experts/{name}" for name in experts}
    for name, folder in own.items():
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert saved[f"xlora_experts/{name}/{file}"] == (Path(folder) / file).read_bytes()
    assert not any(str(tmp_path).encode() in data or str(sources).encode() in data for data in saved.values())
    shutil.copytree(tmp_path / "saved", tmp_path / "elsewhere" / "copy")
    shutil.rmtree(sources)
    shutil.rmtree(tmp_path / "saved")
    again = dt.load(no_cache_llama(), tmp_path / "elsewhere" / "copy").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
    dt.save(again, tmp_path / "resaved")  # from the copy's own experts: the same files
    assert _files(tmp_path / "resaved") == saved


def test_a_save_that_cannot_copy_the_experts_writes_nothing(experts: dict[str, str], tmp_path: Path) -> None:
    sources = tmp_path / "experts"
    shutil.copytree(Path(experts["0"]).parent, sources)
    model = dt.attach(no_cache_llama(), dt.XLoraConfig(adapters={n: str(sources / n) for n in experts}, xlora_size=8))
    dt.attach(model, dt.LoraConfig(target_modules=["k_proj"]), name="xlora_experts")
    with pytest.raises(AdapterFileError, match="adapter 'xlora_experts''s folder"):
        dt.save(model, tmp_path / "clash")  # the other adapter's folder is where the experts' copies go
    (sources / "2" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=f"{re.escape(str(sources / '2'))}, which has no adapter_model"):
        dt.save(model, tmp_path / "gone", names=["default"])
    assert not (tmp_path / "clash").exists() and not (tmp_path / "gone").exists()


def _variant(folder: Path, method: str, fields: dict[str, Any]) -> None:
    """A real adapter of the tiny LLaMA, saved by deltatune: LoRA with ``fields``, or another method."""
    config = dt.IA3Config(target_modules=["q_proj"], feedforward_modules=[]) if method == "ia3" else \
        dt.LoraConfig(r=2, init_lora_weights=False, **fields)
    dt.save(dt.attach(tiny_llama(), config), folder)


VARIANTS = [
    ("ia3", {}, "sets peft_type='IA3'"),
    ("lora", {"use_dora": True, "target_modules": ["q_proj"]}, "sets use_dora=True"),
    ("lora", {"use_qalora": True, "qalora_group_size": 8, "target_modules": ["q_proj"]}, "sets use_qalora=True"),
    ("lora", {"rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj"]}, "sets rank_pattern="),
    ("lora", {"alpha_pattern": {"q_proj": 4}, "target_modules": ["q_proj"]}, "sets alpha_pattern="),
    ("lora", {"bias": "all", "target_modules": ["q_proj"]}, "sets bias='all'"),
    ("lora", {"target_parameters": ["q_proj.weight"], "target_modules": []}, "sets target_parameters="),
    ("lora", {"target_modules": ["embed_tokens"]}, "lora_embedding_A"),
]


@pytest.mark.parametrize("method, fields, message", VARIANTS)
def test_an_unsupported_expert_is_refused_early_by_one_check(experts: dict[str, str], tmp_path: Path, method: str,
                                                             fields: dict[str, Any], message: str) -> None:
    """The attach and the command line's recipe run the same check, which names the folder and the field."""
    odd = tmp_path / "odd"
    _variant(odd, method, fields)
    model = no_cache_llama()
    before = state_hash(model)
    with pytest.raises(AdapterFileError, match=re.escape(message)) as refused:
        dt.attach(model, dt.XLoraConfig(hidden_size=32, adapters={"0": experts["0"], "odd": str(odd)}))
    assert str(odd / "adapter_config.json") in str(refused.value) and "expert 'odd'" in str(refused.value)
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")
    with pytest.raises(ConfigError, match=re.escape(message)) as stopped:
        recipe_experts({"xlora_experts": (f"a={experts['0']}", f"odd={odd}")})
    assert str(refused.value) in str(stopped.value) and "--xlora-experts" in str(stopped.value)


def test_merge_and_mixed_batches_are_refused(experts: dict[str, str]) -> None:
    _, _, ours = pair(experts)
    other = dt.attach(ours, dt.LoraConfig(target_modules=["k_proj"]), name="lora")
    before = state_hash(other)
    with pytest.raises(DeltatuneError, match="merge|X-LoRA"):
        dt.merge(other, "xl")
    with pytest.raises(AdapterError, match="X-LoRA"):
        with dt.routing(other, ["xl", "lora"]):
            pass
    with pytest.raises(AdapterError, match="use_cache=False"):
        other(token_ids(1, 4), past_key_values=object())
    assert state_hash(other) == before


def test_bad_experts_are_refused_unchanged(experts: dict[str, str], tmp_path: Path) -> None:
    model = no_cache_llama()
    before = state_hash(model)
    wide = tmp_path / "wide"  # an expert trained on a wider model with the same module names
    from transformers import LlamaConfig, LlamaForCausalLM

    wide_base = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=128))
    peft.get_peft_model(wide_base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(wide)
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        dt.attach(model, dt.XLoraConfig(hidden_size=32, adapters={"0": str(tmp_path / "missing")}))
    with pytest.raises(TargetError, match="hidden size"):
        dt.attach(model, dt.XLoraConfig(hidden_size=16, adapters=experts))
    with pytest.raises(TargetError, match="does not fit"):
        dt.attach(model, dt.XLoraConfig(hidden_size=32, adapters={"0": str(wide)}))
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


def test_config_checks(experts: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="enable_softmax_topk"):
        dt.XLoraConfig(hidden_size=32, adapters=experts, enable_softmax_topk=True)
    with pytest.raises(ConfigError, match="top_k_lora"):
        dt.XLoraConfig(hidden_size=32, adapters=experts, top_k_lora=4)
    with pytest.raises(ConfigError, match="adapters"):
        dt.XLoraConfig(hidden_size=32)
    with pytest.raises(ConfigError, match="softmax_temperature"):
        dt.XLoraConfig(hidden_size=32, adapters=experts, softmax_temperature="hot")  # type: ignore[arg-type]


def test_hidden_size_zero_is_the_models_and_is_saved_as_a_number(experts: dict[str, str], tmp_path: Path) -> None:
    _, theirs, _ = pair(experts, layerwise_scalings=True)
    ours = dt.attach(no_cache_llama(), dt.XLoraConfig(adapters=experts, xlora_size=8, layerwise_scalings=True)).eval()
    assert ours.deltatune_state.configs["default"].hidden_size == 32
    ours.deltatune_state.model_deltas["default"].classifier.load_state_dict(
        theirs.base_model.internal_xlora_classifier.state_dict())
    ids = token_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    dt.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["hidden_size"] == 32 and "modules_to_save" not in saved  # peft's X-LoRA has no such key


def test_modules_to_save_trains_a_head_copy_that_saves_and_loads(experts: dict[str, str], tmp_path: Path) -> None:
    model = dt.attach(no_cache_llama(), dt.XLoraConfig(adapters=experts, xlora_size=8, modules_to_save=["lm_head"]))
    head = model.get_submodule("lm_head")
    original = head.original_module.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = token_ids(2, 6)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(head.copies["default"].weight, original)
    assert torch.equal(head.original_module.weight, original)
    dt.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    loaded = dt.load(no_cache_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
