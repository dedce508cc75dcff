"""MixLoRA: top-k routed LoRA experts against a dense per-token reference written here in plain torch.

The oracle loops over tokens and experts (softmax, top-k by sorting in Python, renormalise,
``W x + Σ g_e s B_e A_e x``) and gives outputs and gradients; top-k = E must equal the dense
softmax-weighted mixture; the load-balancing loss is ``E Σ f_e P_e`` of the same loop; the trainer
adds it and logs the router statistics; files round-trip; merging is refused; mixed batches route.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import close, state_hash, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_ids, train_command
from deltatune.cli import main
from deltatune.state import delta_layers
from deltatune.errors import AdapterError, ConfigError
from deltatune.methods.mixlora import TokenRouters
from deltatune.registry import RecipeInput, recipe_named
from deltatune.train import TrainConfig, Trainer
from deltatune.train.tasks.base import Batch, Features, Task
from deltatune.train.trainer import TrainingSignals

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Ffn(nn.Module):
    """A feed-forward block: up (with bias), ReLU, down."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 6, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.relu(self.up(x)))


def ffn_model(experts: int = 4, top_k: int = 2, coef: float = 0.01) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Ffn().eval()
    config = dt.MixLoraConfig(r=3, lora_alpha=6, num_experts=experts, top_k=top_k, router_aux_loss_coef=coef,
                              target_modules=["up", "down"], init_lora_weights=False)
    return base, dt.attach(copy.deepcopy(base), config)


def expert_tensors(model: nn.Module, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    delta = model.get_submodule(layer).delta("default")
    return delta.mixlora_router, delta.mixlora_A, delta.mixlora_B


def reference_layer(x: Tensor, linear: nn.Linear, router: Tensor, a: Tensor, b: Tensor, top_k: int,
                    scaling: float, counts: list[Any]) -> Tensor:
    """The layer token by token; appends (probabilities, picks) of each token to ``counts``."""
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(router @ token, dim=0)
        picks = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:top_k]
        total = sum(probs[e] for e in picks)
        out = linear(token)
        for e in picks:
            out = out + probs[e] / total * scaling * (b[e] @ (a[e] @ token))
        rows.append(out)
        counts.append((probs, picks))
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def reference_ffn(base: Ffn, model: nn.Module, x: Tensor, top_k: int, counts: list[list[Any]]) -> Tensor:
    up, down = ([] for _ in range(2))
    h = torch.relu(reference_layer(x, base.up, *expert_tensors(model, "up"), top_k, 2.0, up))
    counts.extend([up, down])
    return reference_layer(h, base.down, *expert_tensors(model, "down"), top_k, 2.0, down)


def reference_balance(counts: list[Any], experts: int) -> Tensor:
    """``E Σ_e f_e P_e`` with f_e the share of tokens that picked e, P_e the mean probability."""
    chosen = torch.tensor([sum(e in picks for _, picks in counts) / len(counts) for e in range(experts)])
    mean_probs = torch.stack([p for p, _ in counts]).mean(0)
    return experts * (chosen * mean_probs).sum()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_outputs_gradients_and_balance_loss_equal_the_token_loop(top_k: int) -> None:
    base, model = ffn_model(top_k=top_k)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    model.train()
    got = model(x)
    counts: list[list[Any]] = []
    want = reference_ffn(base, model, x_ref, top_k, counts)
    assert close(got, want) and (got - base(x)).abs().max() > 1e-2
    routers = next(m for m in model.modules() if isinstance(m, TokenRouters))
    taken = routers.take_loss()
    expected = 0.01 * torch.stack([reference_balance(c, 4) for c in counts]).mean()
    assert taken is not None and torch.allclose(taken, expected, atol=1e-6)

    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((got * weights).sum() + taken, [x, *params])
    want_grads = torch.autograd.grad((want * weights).sum() + expected, [x_ref, *params])
    assert all(close(g, w) for g, w in zip(grads, want_grads))
    assert all(g.abs().max() > 0 for g in grads)


def test_top_k_of_every_expert_is_the_dense_softmax_mixture() -> None:
    base, model = ffn_model(experts=3, top_k=3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    router, a, b = expert_tensors(model, "up")
    gates = torch.softmax(x @ router.T, dim=-1)  # (tokens, experts)
    dense = base.up(x) + 2.0 * torch.einsum("te,eor,eri,ti->to", gates, b, a, x)
    with torch.no_grad():
        assert close(model.get_submodule("up")(x), dense)


def test_balance_loss_of_uniform_routing_is_top_k() -> None:
    """With a zero router every expert is equally likely; Σ f_e = k, so E Σ f_e / E = k."""
    _, model = ffn_model(experts=4, top_k=2, coef=1.0)
    with torch.no_grad():
        for layer in ("up", "down"):
            expert_tensors(model, layer)[0].zero_()
    model.train()
    model(torch.randn(3, 6))
    routers = next(m for m in model.modules() if isinstance(m, TokenRouters))
    loss, stats = routers.take_loss(), routers.take_statistics()
    assert loss is not None and math.isclose(float(loss), 2.0, rel_tol=1e-6)
    assert math.isclose(stats["default/router_entropy"], math.log(4), rel_tol=1e-6)
    assert math.isclose(sum(stats[f"default/expert_load_{e}"] for e in range(4)), 1.0, rel_tol=1e-6)
    assert routers.take_loss() is None and routers.take_statistics() == {}  # taken: nothing left


def test_eval_forwards_record_nothing() -> None:
    _, model = ffn_model()
    model(torch.randn(3, 6))
    routers = next(m for m in model.modules() if isinstance(m, TokenRouters))
    assert routers.take_loss() is None and routers.take_statistics() == {}


def test_a_model_with_untaken_losses_deep_copies() -> None:
    """Recorded losses hold graph tensors, which cannot be copied: a copy starts with none."""
    _, model = ffn_model()
    model.train()
    model(torch.randn(3, 6))
    copied = copy.deepcopy(model)
    original, twin = (next(m for m in x.modules() if isinstance(m, TokenRouters)) for x in (model, copied))
    assert twin.take_loss() is None and original.take_loss() is not None


def test_save_load_round_trip_and_documented_keys(tmp_path: Path) -> None:
    base, model = ffn_model()
    x = torch.randn(3, 6)
    dt.save(model, tmp_path / "moe")
    tensors = load_file(tmp_path / "moe" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.up.mixlora_router": (4, 6), "base_model.model.up.mixlora_A": (4, 3, 6),
        "base_model.model.up.mixlora_B": (4, 10, 3), "base_model.model.down.mixlora_router": (4, 10),
        "base_model.model.down.mixlora_A": (4, 3, 10), "base_model.model.down.mixlora_B": (4, 6, 3)}
    config = json.loads((tmp_path / "moe" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MIXLORA" and config["top_k"] == 2 and config["num_experts"] == 4
    loaded = dt.load(copy.deepcopy(base), tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_merge_is_refused_and_disabled_is_the_base() -> None:
    base, model = ffn_model()
    x = torch.randn(3, 6)
    before = state_hash(model)
    for call in (lambda: dt.merge(model), lambda: dt.unload(model, merge=True)):
        with pytest.raises(AdapterError, match="no weight to fold"):
            call()
        assert state_hash(model) == before
    with torch.no_grad(), dt.disabled(model):
        assert torch.equal(model(x), base(x))


def test_mixed_batch_routes_each_row_to_its_experts() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        dt.attach(model, dt.MixLoraConfig(r=2, num_experts=3, top_k=2, init_lora_weights=False,
                                          target_modules=["up_proj", "down_proj"]), name=name)
    ids = token_ids(batch=3)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            dt.set_active(model, name)
            alone[name] = model(ids).logits
        plain = base(ids).logits
        with dt.routing(model, ["b", None, "a"]):
            mixed = model(ids).logits
    assert close(mixed[0], alone["b"][0]) and close(mixed[2], alone["a"][2]) and close(mixed[1], plain[1])
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3


class Regression(Task):
    """A minimal task for the trainer: rows of (x, target), squared error."""

    name, task_type, metric, columns = "test-regression", "FEATURE_EXTRACTION", "neg_mse", {}

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        return Ffn()

    def encode(self, rows: Any) -> list[Features]:
        return list(rows)

    def collate(self, features: Sequence[Features]) -> Batch:
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    def evaluate(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> dict[str, float]:
        return {"neg_mse": -float(self.loss(model, self.collate(features)))}

    def predict(self, model: nn.Module, rows: Sequence[Any], batch_size: int = 32) -> list[Any]:
        return [model(r["x"]) for r in rows]


def test_trainer_adds_the_balance_loss_and_logs_router_statistics(tmp_path: Path) -> None:
    _, model = ffn_model(coef=0.5)
    feature = {"x": torch.randn(5, 6, generator=torch.Generator().manual_seed(6)), "y": torch.zeros(5, 6)}
    task = Regression(tokenizer=None)
    model.train()
    plain = float(task.loss(model, task.collate([feature] * 2)))  # every batch is this one: rows are equal
    routers = next(m for m in model.modules() if isinstance(m, TokenRouters))
    aux = routers.take_loss()
    assert aux is not None and float(aux) > 0.5  # the balance loss is at least 1 (perfect balance: top_k = 2)
    routers.take_statistics()
    trainer = Trainer(model, task, [feature] * 4, config=TrainConfig(output_dir=str(tmp_path), max_steps=2,
                                                                     batch_size=2, log_every=1, progress=False))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["event"] == "train")
    assert math.isclose(first["loss"], plain + float(aux), rel_tol=1e-5)
    loads = [first[f"default/expert_load_{e}"] for e in range(4)]
    assert math.isclose(sum(loads), 1.0, rel_tol=1e-5) and 0 < first["default/router_entropy"] <= math.log(4)
    assert isinstance(routers, TrainingSignals)


def gated_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32,
                                               feed_forward_proj="gated-gelu", decoder_start_token_id=0))


FEEDFORWARD = [  # (model, the parent modules whose linear layers form the feed-forward block)
    pytest.param(tiny_llama, r"model\.layers\.\d\.mlp", id="llama"),
    pytest.param(tiny_gpt2, r"transformer\.h\.\d\.mlp", id="gpt2"),
    pytest.param(tiny_bert, r"bert\.encoder\.layer\.\d\.(intermediate|output)", id="bert"),
    pytest.param(tiny_t5, r"(en|de)coder\.block\.\d\.layer\.\d\.DenseReluDense", id="t5"),
    pytest.param(gated_t5, r"(en|de)coder\.block\.\d\.layer\.\d\.DenseReluDense", id="t5-gated"),
]


@pytest.mark.parametrize(("factory", "parent"), FEEDFORWARD)
def test_default_targets_are_the_feedforward_linears(factory: Any, parent: str) -> None:
    """Exactly the linear layers directly inside each block's feed-forward modules: not BERT's
    ``attention.output.dense`` nor GPT-2's ``attn.c_proj``."""
    base = factory()
    wanted = {n for n, m in base.named_modules()
              if re.fullmatch(rf"{parent}\.\w+", n) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}
    model = dt.attach(base, dt.MixLoraConfig(num_experts=2, top_k=1))
    assert {n for n, _ in delta_layers(model)} == wanted and len(wanted) >= 4


def test_no_default_for_the_architecture_raises_with_the_models_names() -> None:
    model = Ffn()
    before = state_hash(model)
    with pytest.raises(dt.TargetError, match=r"target_modules=None .*\['down', 'up'\]"):
        dt.attach(model, dt.MixLoraConfig())
    assert state_hash(model) == before and not hasattr(model, "deltatune_state")


def test_train_command_uses_the_defaults(tiny_bert_dir: Path, sentiment_file: Path, tmp_path: Path,
                                         keep_thread_count: None) -> None:
    args = train_command(tiny_bert_dir, sentiment_file, tmp_path, options=("--max-steps", "1"))
    assert main([*args[:args.index("--target-modules")], "--method", "mixlora", "--no-initial-eval"]) == 0
    routers = {k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if k.endswith("mixlora_router")}
    assert routers == {f"base_model.model.bert.encoder.layer.{i}.{part}.dense.mixlora_router"
                       for i in range(2) for part in ("intermediate", "output")}


def test_config_and_recipe() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        dt.MixLoraConfig(num_experts=2, top_k=3, target_modules=["up"])
    options = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "use_rslora": False, "num_experts": 6, "top_k": 2,
               "router_aux_loss_coef": 0.02}
    built = recipe_named("mixlora").build(RecipeInput(options, ("c_fc",), None, {"task_type": None,
                                                                                  "modules_to_save": None}, 10))
    assert built == dt.MixLoraConfig(r=4, lora_alpha=8.0, num_experts=6, top_k=2, router_aux_loss_coef=0.02,
                                     target_modules=["c_fc"])
