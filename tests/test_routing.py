"""Mixed batches (``dt.routing``, peft's ``adapter_names=``): every row equals its adapter run alone.

The oracle for a routed batch is the same model run row by row with only that row's adapter active
(``dt.set_active``), or with none for a base row; for gradients, each adapter trained alone on its
rows. peft's ``adapter_names`` path is the second oracle for LoRA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune import layer as layer_module
from prompt_models import bert_seq, llama, max_diff, perturb_trainable
from conftest import token_ids

ATOL = 1e-5
ROUTE = ["a", "b", None, "a", "c", "b"]
PROMPT_ROUTE = ["a", "b", "a", "c", "b", "c"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

Attach = Callable[[nn.Module, str, int], None]


def _lora(**extra: Any) -> Attach:
    ranks = {"a": 4, "b": 8, "c": 2}

    def attach(model: nn.Module, name: str, seed: int) -> None:
        dt.attach(model, dt.LoraConfig(r=ranks[name], lora_alpha=2 * ranks[name], init_lora_weights=False,
                                       target_modules=LLAMA_TARGETS, **extra), name=name)
    return attach


def _perturbed(make: Callable[[], dt.DeltaConfig]) -> Attach:
    def attach(model: nn.Module, name: str, seed: int) -> None:
        dt.attach(model, make(), name=name)
        _perturb_adapter(model, name, seed)
    return attach


def _perturb_adapter(model: nn.Module, name: str, seed: int) -> None:
    """Seeded noise on adapter ``name``'s tensors only, so adapters differ from each other and from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if f".{name}." in f".{key}." and param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


LLAMA_METHODS: dict[str, Attach] = {
    "lora-ranks": _lora(),
    "lora-rslora": _lora(use_rslora=True),
    "dora": _lora(use_dora=True),
    "ia3": _perturbed(lambda: dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                           feedforward_modules=["down_proj"])),
    "vera": _perturbed(lambda: dt.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "adalora": _perturbed(lambda: dt.AdaLoraConfig(init_r=6, target_r=4, total_step=20, tinit=2, tfinal=2,
                                                   target_modules=["q_proj", "v_proj"])),
}
BERT_METHODS: dict[str, Attach] = {
    "lora-head": _perturbed(lambda: dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bitfit": _perturbed(lambda: dt.BitFitConfig(target_modules=["query", "output.dense"])),
    "seq-bn": _perturbed(lambda: dt.SeqBnConfig(reduction_factor=4)),
    "double-seq-bn": _perturbed(lambda: dt.DoubleSeqBnConfig(reduction_factor=4)),
    "par-bn": _perturbed(lambda: dt.ParBnConfig(reduction_factor=4)),
}
PROMPT_METHODS: dict[str, Attach] = {
    "prompt-tuning": _perturbed(lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p-tuning": _perturbed(lambda: dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                          encoder_hidden_size=16)),
    "prefix": _perturbed(lambda: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
}


def _adapted(factory: Callable[[], nn.Module], attach: Attach) -> nn.Module:
    model = factory()
    for seed, name in enumerate(("a", "b", "c")):
        attach(model, name, seed)
    return model


def _inputs(rows: int, padded: bool = False) -> dict[str, Tensor]:
    ids = token_ids(rows, 7)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


def _alone(model: nn.Module, route: list[str | None], inputs: dict[str, Tensor]) -> Tensor:
    """Row by row, with only that row's adapter active (none for a base row)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(route):
            dt.set_active(model, [] if name is None else name)
            outs.append(model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits)
    return torch.cat(outs)


def _routed(model: nn.Module, route: list[str | None], inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad(), dt.routing(model, route):
        return model(**inputs).logits


@pytest.mark.parametrize("method", sorted(LLAMA_METHODS))
def test_each_row_equals_its_adapter_alone_on_llama(method: str) -> None:
    model = _adapted(llama, LLAMA_METHODS[method])
    inputs = _inputs(len(ROUTE), padded=True)
    assert max_diff(_routed(model, ROUTE, inputs), _alone(model, ROUTE, inputs)) <= ATOL


@pytest.mark.parametrize("method", sorted(BERT_METHODS))
def test_each_row_equals_its_adapter_alone_on_bert(method: str) -> None:
    """Task heads trained per adapter (modules_to_save) are routed too: each row gets its adapter's head."""
    model = _adapted(bert_seq, BERT_METHODS[method])
    inputs = _inputs(len(ROUTE))
    assert max_diff(_routed(model, ROUTE, inputs), _alone(model, ROUTE, inputs)) <= ATOL


@pytest.mark.parametrize("method", sorted(PROMPT_METHODS))
def test_prompt_adapters_route_when_every_row_has_one(method: str) -> None:
    model = _adapted(llama, PROMPT_METHODS[method])
    inputs = _inputs(len(PROMPT_ROUTE))
    assert max_diff(_routed(model, PROMPT_ROUTE, inputs), _alone(model, PROMPT_ROUTE, inputs)) <= ATOL
    with pytest.raises(dt.AdapterError, match="every row must take exactly one"):
        with dt.routing(model, ["a", None, "b", "c", "a", "b"]):
            pass


def test_one_adapter_for_every_row_and_the_base_alone() -> None:
    model = _adapted(llama, _lora())
    inputs = _inputs(3)
    for route in (["b", "b", "b"], [None, None, None], ["c", None, None]):
        assert max_diff(_routed(model, route, inputs), _alone(model, route, inputs)) <= ATOL


def test_many_lora_adapters_take_one_batched_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several LoRA adapters in a batch, each layer computes their changes in one batched
    product over stacked factors (not one product per adapter), and it equals the per-adapter path."""
    model = _adapted(llama, _lora())
    inputs = _inputs(len(ROUTE), padded=True)
    calls: list[int] = []
    (key, batched), = [(k, f) for k, f in layer_module.ROUTED_CHANGE.items() if k[1] == "linear"]

    def counting(*args: Any) -> Tensor | None:
        calls.append(1)
        return batched(*args)

    monkeypatch.setitem(layer_module.ROUTED_CHANGE, key, counting)
    routed = _routed(model, ROUTE, inputs)
    assert len(calls) == 2 * len(LLAMA_TARGETS)  # every adapted layer of both blocks, once
    monkeypatch.delitem(layer_module.ROUTED_CHANGE, key)
    grouped = _routed(model, ROUTE, inputs)
    assert max_diff(routed, grouped) <= ATOL
    assert max_diff(routed, _alone(model, ROUTE, inputs)) <= ATOL


def _row_weighted_loss(logits: Tensor) -> Tensor:
    """A loss that is a sum of per-row terms, so each row's share of the gradient is exact."""
    weights = torch.linspace(-1, 1, logits[0].numel()).reshape(logits.shape[1:])
    return (logits * weights).sum()


def _adapter_grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora-ranks", "ia3", "dora"])
def test_a_routed_training_step_gives_each_adapter_the_gradient_of_its_rows(method: str) -> None:
    model = _adapted(llama, LLAMA_METHODS[method]).train()
    inputs = _inputs(len(ROUTE))
    with dt.routing(model, ROUTE):
        _row_weighted_loss(model(**inputs).logits).backward()
    routed = _adapter_grads(model)
    model.zero_grad(set_to_none=True)
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(ROUTE) if n == name]
        dt.set_active(model, name)
        _row_weighted_loss(model(**{k: v[rows] for k, v in inputs.items()}).logits).backward()
    reference = _adapter_grads(model)
    assert routed.keys() == reference.keys() and routed
    for key in routed:
        assert max_diff(routed[key], reference[key]) <= ATOL, key


def _same_tokens(in_batch: Tensor, alone: Tensor, end: int = 2) -> bool:
    """A row generated in a batch equals the row generated alone, followed (when the row alone
    stopped early at the end token) by end tokens only."""
    return torch.equal(in_batch[:alone.numel()], alone) and bool((in_batch[alone.numel():] == end).all())


def test_the_keyword_routes_forward_and_generate() -> None:
    model = _adapted(llama, _lora())
    inputs = _inputs(len(ROUTE))
    dt.set_active(model, "c")
    with torch.no_grad():
        by_keyword = model(**inputs, adapter_names=ROUTE).logits
    assert max_diff(by_keyword, _alone(model, ROUTE, inputs)) <= ATOL
    dt.set_active(model, "c")
    with torch.no_grad():
        model(**inputs, adapter_names=["__base__", "a", "b", "a", "c", "b"])
        generated = model.generate(**inputs, adapter_names=ROUTE, max_new_tokens=4, do_sample=False)
        beams = model.generate(**inputs, adapter_names=ROUTE, max_new_tokens=3, num_beams=2, do_sample=False)
    assert dt.active_adapters(model) == ("c",)  # the call's route is gone afterwards
    for i, name in enumerate(ROUTE):
        dt.set_active(model, [] if name is None else name)
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            assert _same_tokens(generated[i], model.generate(**row, max_new_tokens=4, do_sample=False)[0])
            assert _same_tokens(beams[i], model.generate(**row, max_new_tokens=3, num_beams=2, do_sample=False)[0])


def test_the_keyword_routes_prompt_adapters_in_generate_and_refuses_them_in_forward() -> None:
    model = _adapted(llama, PROMPT_METHODS["prefix"])
    inputs = _inputs(len(PROMPT_ROUTE))
    with torch.no_grad():
        generated = model.generate(**inputs, adapter_names=PROMPT_ROUTE, max_new_tokens=3, do_sample=False)
        for i, name in enumerate(PROMPT_ROUTE):
            dt.set_active(model, name)
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            assert _same_tokens(generated[i], model.generate(**row, max_new_tokens=3, do_sample=False)[0])
        dt.set_active(model, "a")
        before = model(**inputs).logits
        with pytest.raises(dt.AdapterError, match="dt.routing"):
            model(**inputs, adapter_names=PROMPT_ROUTE)
        assert dt.active_adapters(model) == ("a",)
        assert torch.equal(model(**inputs).logits, before)


def test_peft_adapter_names_give_the_same_outputs(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = _adapted(llama, _lora())
    for name in ("a", "b", "c"):
        dt.save(ours, tmp_path / name, names=[name])
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "a" / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name / name, adapter_name=name)
    theirs.eval()
    inputs = _inputs(len(ROUTE), padded=True)
    peft_route = ["__base__" if n is None else n for n in ROUTE]
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=peft_route).logits
        ours_out = ours(**inputs, adapter_names=ROUTE).logits
    assert max_diff(ours_out, expected) <= ATOL


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_routes_are_refused_and_change_nothing() -> None:
    model = _adapted(llama, _lora())
    dt.set_active(model, "b")
    inputs = _inputs(4)
    before, state = _routed(model, ["b"] * 4, inputs), _state(model)
    cases: list[tuple[Any, str]] = [
        (["a", "zzz", None, "a"], "no adapter named 'zzz'"),
        ("a", "one adapter name"),
        ([], "one adapter name"),
        (["a", 3, None, "a"], "adapter names or None"),
    ]
    for route, message in cases:
        with pytest.raises(dt.AdapterError, match=message):
            with dt.routing(model, route):
                pass
        assert dt.active_adapters(model) == ("b",)
    with pytest.raises(dt.AdapterError, match="batch has 4"):
        model(**inputs, adapter_names=["a", "b", None])
    with pytest.raises(dt.AdapterError, match="batch has 4 rows"):
        with torch.no_grad(), dt.routing(model, ["a", "b", None]):
            model(**inputs)
    with pytest.raises(dt.AdapterError, match="per batch row"):
        model(**inputs, adapter_names="a")
    assert dt.active_adapters(model) == ("b",)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_routed(model, ["b"] * 4, inputs), before)


def test_merged_adapters_refuse_routing_and_deleting_inside_the_block_is_safe() -> None:
    model = _adapted(llama, _lora())
    dt.merge(model, "a")
    with pytest.raises(dt.AdapterError, match="merged"):
        with dt.routing(model, ["a", "b"]):
            pass
    dt.unmerge(model)
    dt.set_active(model, ["a", "c"])
    with dt.routing(model, ["a", "b"]):
        dt.delete_adapter(model, "c")
    assert dt.active_adapters(model) == ("a",)


def test_unload_takes_the_keyword_away() -> None:
    model = _adapted(llama, _lora())
    plain = dt.unload(copy.deepcopy(model), merge=False)
    assert "generate" not in plain.__dict__
    assert not plain._forward_pre_hooks


def test_stacked_factors_are_kept_between_calls_without_gradients_and_follow_changes() -> None:
    """Serving runs one route for many steps: the stack is built once, and any in-place change of
    an adapter's tensors (a hot-swap, an optimizer step) or a deleted adapter makes a new one."""
    from deltatune.methods import lora_routed

    model = _adapted(llama, _lora())
    inputs = _inputs(len(ROUTE))
    first = _routed(model, ROUTE, inputs)
    kept = dict(lora_routed._STACKS)
    assert kept and torch.equal(_routed(model, ROUTE, inputs), first)
    assert all(lora_routed._STACKS[k] is v for k, v in kept.items())  # reused, not rebuilt
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(".deltas.b.B"):
                param.mul_(2)
    changed = _routed(model, ROUTE, inputs)
    assert max_diff(changed, _alone(model, ROUTE, inputs)) <= ATOL
    assert max_diff(changed, first) > 1e-3


class _EmbedConvLinear(nn.Module):
    """LoRA on every base kind but the transposed one: an embedding, a 1-d conv, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 12)
        self.conv = nn.Conv1d(12, 12, kernel_size=3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        hidden = self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return type("Out", (), {"logits": self.head(hidden)})()


def test_lora_routes_on_embeddings_convolutions_and_a_4bit_base() -> None:
    model = _EmbedConvLinear()
    for seed, name in enumerate(("a", "b", "c")):
        dt.attach(model, dt.LoraConfig(r=2 + seed, init_lora_weights=False, target_modules=["embed", "conv", "head"]),
                  name=name)
    inputs = {"input_ids": torch.randint(0, 50, (len(ROUTE), 6), generator=torch.Generator().manual_seed(3))}
    assert max_diff(_routed(model, ROUTE, inputs), _alone(model, ROUTE, inputs)) <= ATOL

    quantized = dt.quantize(llama(), dt.QuantConfig(quant_type="nf4"))
    for seed, name in enumerate(("a", "b", "c")):
        _lora()(quantized, name, seed)
    inputs = _inputs(len(ROUTE))
    assert max_diff(_routed(quantized, ROUTE, inputs), _alone(quantized, ROUTE, inputs)) <= ATOL
