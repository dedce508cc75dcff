"""LoRA+ optimizer: group membership and learning rates, argument checks, and parity with peft's
``create_loraplus_optimizer`` (same groups as multisets of (shape, lr, weight_decay), and the same
weights after one training step). peft is only imported as a test oracle.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama, token_ids
from deltatune.methods.dora import DoraDelta
from deltatune.methods.lora import LoraDelta
from deltatune.state import delta_layers, saved_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LR, RATIO, LR_EMB, WD = 1e-3, 16.0, 1e-6, 0.1


def lora(**kwargs: Any) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs})


def groups_by_param(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """id(param) -> its group; fails if a parameter is in two groups."""
    out: dict[int, dict[str, Any]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = group
    return out


def lora_deltas(model: nn.Module) -> list[LoraDelta]:
    return [d for _, layer in delta_layers(model) for d in layer.deltas.values() if isinstance(d, LoraDelta)]


def check_covers_trainable(model: nn.Module, opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    by_param = groups_by_param(opt)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(by_param) == trainable  # every trainable param exactly once, no frozen one
    return by_param


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_all_linear_groups(use_dora: bool) -> None:
    model = dt.attach(tiny_llama(), lora(target_modules="all-linear", use_dora=use_dora))
    opt = dt.loraplus_optimizer(model, LR, weight_decay=WD)
    by_param = check_covers_trainable(model, opt)
    deltas = lora_deltas(model)
    assert deltas and all(isinstance(d, DoraDelta) == use_dora for d in deltas)
    for d in deltas:
        assert by_param[id(d.A)]["lr"] == LR and by_param[id(d.A)]["name"] == "loraplus_A"
        assert by_param[id(d.B)]["lr"] == LR * RATIO and by_param[id(d.B)]["name"] == "loraplus_B"
        assert by_param[id(d.A)]["weight_decay"] == WD and by_param[id(d.B)]["weight_decay"] == WD
        if use_dora:  # 1-D: with B, as in peft and the LoRA+ reference code
            assert by_param[id(d.magnitude)]["lr"] == LR * RATIO
    assert opt.defaults["lr"] == LR and isinstance(opt, torch.optim.AdamW)


def test_embedding_deltas_get_embedding_lr() -> None:
    model = dt.attach(tiny_llama(), lora(target_modules=["embed_tokens", "q_proj"]))
    opt = dt.loraplus_optimizer(model, LR, loraplus_lr_embedding=LR_EMB)
    by_param = check_covers_trainable(model, opt)
    kinds = Counter(d.base.kind for d in lora_deltas(model))
    assert kinds == {"embedding": 1, "linear": 2}
    for d in lora_deltas(model):
        if d.base.kind == "embedding":  # peft puts both A and B of an embedding adapter here
            assert by_param[id(d.A)]["lr"] == by_param[id(d.B)]["lr"] == LR_EMB
            assert by_param[id(d.A)]["name"] == "loraplus_embedding"
        else:
            assert by_param[id(d.A)]["lr"] == LR and by_param[id(d.B)]["lr"] == LR * RATIO


def test_modules_to_save_and_biases() -> None:
    model = dt.attach(tiny_gpt2(), lora(target_modules=["c_attn"], modules_to_save=["ln_f", "lm_head"], bias="all"))
    opt = dt.loraplus_optimizer(model, LR, weight_decay=WD)
    by_param = check_covers_trainable(model, opt)
    saved = {name: module.copies["default"] for name, module in saved_modules(model)}
    assert set(saved) == {"transformer.ln_f", "lm_head"}
    head = saved["lm_head"].weight
    assert by_param[id(head)]["lr"] == LR and by_param[id(head)]["weight_decay"] == WD  # 2-D: base group
    ln = saved["transformer.ln_f"]  # 1-D in a LayerNorm: B lr, no decay (peft)
    for p in (ln.weight, ln.bias):
        assert by_param[id(p)]["lr"] == LR * RATIO and by_param[id(p)]["weight_decay"] == 0.0
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert biases and all(by_param[id(p)]["name"] == "loraplus_B_no_decay" for p in biases)


def test_multiple_adapters_and_custom_optimizer() -> None:
    model = dt.attach(tiny_llama(), lora(target_modules=["q_proj"]))
    dt.attach(model, lora(target_modules=["v_proj"], use_dora=True), name="other")
    opt = dt.loraplus_optimizer(model, LR, optimizer_class=torch.optim.SGD, momentum=0.9)
    by_param = check_covers_trainable(model, opt)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert all(by_param[id(d.B)]["lr"] == LR * RATIO for d in lora_deltas(model))
    assert len(lora_deltas(model)) == 4


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"), ({"loraplus_lr_embedding": -1.0}, "loraplus_lr_embedding"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"optimizer_class": nn.Linear}, "optimizer_class"),
    ({"params": []}, "params"),
])
def test_bad_arguments(kwargs: dict[str, Any], field: str) -> None:
    model = dt.attach(tiny_llama(), lora(target_modules=["q_proj"]))
    args = {"lr": LR, **kwargs}
    with pytest.raises(dt.ConfigError, match=rf"loraplus_optimizer\.{field}=.*Fix:") as info:
        dt.loraplus_optimizer(model, **args)
    assert isinstance(info.value, ValueError)


def test_no_trainable_lora() -> None:
    with pytest.raises(dt.ConfigError, match=r"loraplus_optimizer\.model=.*no trainable LoRA.*dt.attach"):
        dt.loraplus_optimizer(tiny_llama(), LR)  # no adapter at all
    ia3 = dt.attach(tiny_llama(), dt.IA3Config(target_modules=["k_proj", "down_proj"],
                                               feedforward_modules=["down_proj"]))
    with pytest.raises(dt.ConfigError, match="no trainable LoRA"):
        dt.loraplus_optimizer(ia3, LR)
    model = dt.attach(tiny_llama(), lora(target_modules=["q_proj"]))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(dt.ConfigError, match="no trainable LoRA"):
        dt.loraplus_optimizer(model, LR)


# --- parity with peft ---------------------------------------------------------------------------

PARITY = {
    "all-linear": {"target_modules": "all-linear"},
    "dora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "modules-to-save": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
}


def signature(opt: torch.optim.Optimizer) -> Counter[tuple[tuple[int, ...], float, float]]:
    return Counter((tuple(p.shape), g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"])


def group_signatures(opt: torch.optim.Optimizer) -> list[Counter[tuple[tuple[int, ...], float, float]]]:
    sigs = [Counter((tuple(p.shape), g["lr"], g["weight_decay"]) for p in g["params"]) for g in opt.param_groups]
    return sorted((s for s in sigs if s), key=lambda c: sorted(c.items()))


@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_peft(case: str, tmp_path: Path) -> None:
    import peft
    from peft.optimizers import create_loraplus_optimizer

    config = PARITY[case]
    base = tiny_llama()
    ours = dt.attach(copy.deepcopy(base), lora(**config))
    dt.save(ours, tmp_path / "dt")  # same init for peft: load our weights
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dt", is_trainable=True)

    kwargs: dict[str, Any] = {"betas": (0.9, 0.99), "eps": 1e-8}
    opt = dt.loraplus_optimizer(ours, LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=1e-4,
                                weight_decay=WD, **kwargs)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_lr_embedding=1e-4, loraplus_weight_decay=WD, **kwargs)
    assert signature(opt) == signature(ref)
    assert group_signatures(opt) == group_signatures(ref)

    ids = token_ids(vocab=128)
    for model, optimizer in ((ours, opt), (theirs, ref)):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    dt.save(ours, tmp_path / "dt_after")
    theirs.save_pretrained(tmp_path / "peft_after")
    mine = load_file(tmp_path / "dt_after" / "adapter_model.safetensors")
    other = load_file(tmp_path / "peft_after" / "adapter_model.safetensors")
    before = load_file(tmp_path / "dt" / "adapter_model.safetensors")
    assert mine and set(mine) <= set(other)
    moved = 0
    for key, value in mine.items():
        assert torch.allclose(value, other[key], atol=1e-6, rtol=0), key
        moved += not torch.equal(value, before[key])
    assert moved >= len(mine) // 2  # the step really changed the adapter
