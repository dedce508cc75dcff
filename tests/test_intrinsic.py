"""Training in a random subspace (theta = theta0 + P z): the Fastfood transform against the dense matrix
it stands for, the model's theta and gradients against a dense oracle, training, bake / save / load,
seeds, the errors, and d90 over sweep rows."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
import deltatune.projections as projections
from conftest import close, perturb, state_hash, tiny_bert, token_ids
from deltatune.errors import ConfigError, TrainingError
from deltatune.fastfood import Fastfood, hadamard
from deltatune.intrinsic import SUBSPACE_ATTR, IntrinsicSubspace, d90, enter_subspace, subspace_of
from deltatune.projections import DenseGaussian
from deltatune.train.options import split_options


def sylvester(size: int) -> Tensor:
    """The unnormalised Walsh-Hadamard matrix, built by its definition H_2n = [[H, H], [H, -H]]."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), matrix)
    return matrix


def fastfood_matrix(ff: Fastfood) -> Tensor:
    """The D x d matrix: the stacked blocks H G_b Pi_b H B_b, each built as explicit dense matrices (fp64)."""
    size, blocks = ff.block, ff.signs.shape[0]
    h = sylvester(size)
    perms = ff.flat_perm.long().view(blocks, size) - torch.arange(blocks).unsqueeze(1) * size
    stacked = []
    for b in range(blocks):
        pi = torch.zeros(size, size, dtype=torch.float64)
        pi[torch.arange(size), perms[b]] = 1.0  # (Pi v)_i = v[perm_i]
        g, signs = torch.diag(ff.scaled_gauss[b].double()), torch.diag(ff.signs[b].double())
        stacked.append(h @ g @ pi @ h @ signs)
    return torch.cat(stacked)[:ff.D, :ff.d]  # z is zero-padded: only its d columns act


def projection_matrix(kind: str, d: int, D: int, seed: int) -> Tensor:
    """P as a dense fp64 matrix, from a projection built independently of the model's."""
    return fastfood_matrix(Fastfood(d, D, seed)) if kind == "fastfood" else DenseGaussian(d, D, seed).matrix().double()


def lora_bert() -> nn.Module:
    model = dt.attach(tiny_bert(), dt.LoraConfig(r=2, target_modules=("query", "value"), task_type="SEQ_CLS"))
    perturb(model)  # B != 0: theta0 is not the identity adapter, so a wrong theta0 shows
    return model.eval()  # no dropout; the gradient path is chosen by grad mode, not by train()


def trainable_vector(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).double()


def set_trainable(model: nn.Module, flat: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


# -- the transforms -------------------------------------------------------------------------------

def test_hadamard_is_the_sylvester_matrix() -> None:
    for size in (1, 2, 8, 64):
        assert torch.equal(hadamard(torch.eye(size, dtype=torch.float64)), sylvester(size))
    for shape in ((3, 2, 128), (2, 2048)):  # batch dimensions; 2048 = 32 x 32 x 2, three factors
        x = torch.randn(*shape, dtype=torch.float64)
        assert torch.allclose(hadamard(x), x @ sylvester(shape[-1]), atol=1e-10)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.ones(6))


@pytest.mark.parametrize(("d", "D"), [(5, 37), (8, 8), (3, 64), (1, 5)])
def test_fastfood_equals_the_dense_matrix(d: int, D: int) -> None:
    ff, z = Fastfood(d, D, seed=3), torch.randn(d, dtype=torch.float64)
    assert ff(z.float()).shape == (D,)
    assert torch.allclose(ff(z.float()).double(), fastfood_matrix(ff) @ z, atol=1e-5)
    if D % ff.block == 0:  # whole blocks: every column has norm exactly 1
        assert torch.allclose(fastfood_matrix(ff).norm(dim=0), torch.ones(d, dtype=torch.float64), atol=1e-5)


def test_fastfood_backward_is_the_transpose() -> None:
    ff, z, g = Fastfood(6, 40, seed=1), torch.randn(6, requires_grad=True), torch.randn(40)
    (ff(z) * g).sum().backward()
    assert z.grad is not None
    assert torch.allclose(z.grad.double(), fastfood_matrix(ff).T @ g.double(), atol=1e-5)


def test_dense_projection_draws_the_same_chunks_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = DenseGaussian(5, 23, seed=4).matrix()
    monkeypatch.setattr(projections, "CHUNK_VALUES", 10)  # 2 rows per chunk: 12 chunks, the last one short
    chunked = DenseGaussian(5, 23, seed=4)
    assert chunked.rows == 2
    z, g = torch.randn(5, requires_grad=True), torch.randn(23)
    out = chunked(z)
    (out * g).sum().backward()
    small = chunked.matrix()
    assert small.shape == (23, 5) and not torch.equal(small, whole)  # chunk seeds depend on the chunking
    assert torch.allclose(out, small @ z.detach(), atol=1e-6)
    assert z.grad is not None and torch.allclose(z.grad, small.T @ g, atol=1e-6)


@pytest.mark.parametrize("kind", ["fastfood", "dense"])
def test_projections_are_functions_of_the_seed(kind: str) -> None:
    z = torch.randn(7)
    first, again, other = (projections.make_projection(kind, 7, 50, s) for s in (0, 0, 1))
    assert torch.equal(first(z), again(z))
    assert not torch.allclose(first(z), other(z))


# -- the model in its subspace ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fastfood", "dense"])
@pytest.mark.parametrize("said", [False, True])
def test_same_z_gives_the_same_theta_as_a_dense_oracle(kind: str, said: bool) -> None:
    model, x = lora_bert(), token_ids()
    oracle = copy.deepcopy(model)
    theta0 = trainable_vector(model)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    space = enter_subspace(model, 40, kind, seed=7, said=said)
    assert [p for p in model.parameters() if p.requires_grad] == ([space.z, space.scales] if said else [space.z])
    with torch.no_grad():
        space.z.copy_(torch.randn(space.z.shape) * 0.5)
        space.scales.copy_(torch.rand(space.scales.shape) + 0.5)
    delta = projection_matrix(kind, 40 - tensors if said else 40, theta0.numel(), 7) @ space.z.detach().double()
    if said:
        sizes = torch.tensor([p.numel() for p in oracle.parameters() if p.requires_grad])
        delta = delta * space.scales.detach().double().repeat_interleave(sizes)
    set_trainable(oracle, theta0 + delta)
    with torch.enable_grad():
        got = model(x).logits  # through the swapped-in theta, with a graph to z
    assert got.requires_grad
    with torch.no_grad():
        assert close(got.detach(), oracle(x).logits)
        assert close(model(x).logits, oracle(x).logits)  # without a graph: the parameters hold theta
    assert torch.allclose(trainable_vector_of(model, space), theta0 + delta, atol=1e-5)


def trainable_vector_of(model: nn.Module, space: IntrinsicSubspace) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in space.params]).double()


def test_only_z_gets_gradients_and_they_are_p_transposed_times_the_dense_gradient() -> None:
    model, x = lora_bert(), token_ids()
    oracle = copy.deepcopy(model)
    space = enter_subspace(model, 30, "fastfood", seed=2)
    with torch.no_grad():
        space.z.copy_(torch.randn(30) * 0.3)
    model(x).logits.square().sum().backward()
    assert space.z.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(SUBSPACE_ATTR))
    set_trainable(oracle, trainable_vector_of(model, space))  # theta after sync
    oracle(x).logits.square().sum().backward()
    dense_grad = torch.cat([p.grad.reshape(-1) for p in oracle.parameters() if p.requires_grad and p.grad is not None])
    p_matrix = fastfood_matrix(Fastfood(30, dense_grad.numel(), 2))
    assert dense_grad.numel() == space.total
    assert torch.allclose(space.z.grad.double(), p_matrix.T @ dense_grad.double(), rtol=1e-4, atol=1e-5)


def test_a_plain_model_with_a_tied_parameter_projects_each_tensor_once() -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # one tensor, two places
    model, x = nn.Sequential(first, nn.Tanh(), second), torch.randn(3, 4)
    oracle = copy.deepcopy(model)
    space = enter_subspace(model, 6, "dense", seed=0)
    assert space.total == 16 + 4 + 4 and len(space.locations[0]) == 2
    with torch.no_grad():
        space.z.copy_(torch.randn(6))
    out = model(x)
    out.sum().backward()
    assert isinstance(space.projection, DenseGaussian)
    p_matrix = space.projection.matrix().double()
    set_trainable(oracle, trainable_vector(oracle) + p_matrix @ space.z.detach().double())
    oracle_out = oracle(x)
    oracle_out.sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in oracle.parameters() if p.grad is not None]).double()
    assert close(out.detach(), oracle_out.detach())
    assert space.z.grad is not None
    assert torch.allclose(space.z.grad.double(), p_matrix.T @ grads, atol=1e-5)


def test_a_failed_forward_puts_the_parameters_back() -> None:
    model = lora_bert()
    before = {id(p) for p in model.parameters()}
    enter_subspace(model, 10)
    with pytest.raises(Exception):
        model(torch.full((1, 4), 10_000))  # token ids outside the vocabulary
    assert all(isinstance(p, nn.Parameter) for m in model.modules() for p in m._parameters.values() if p is not None)
    assert before <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("said", [False, True])
def test_training_in_the_subspace_lowers_the_loss_and_bakes_into_a_loadable_adapter(said: bool, tmp_path: Path) -> None:
    model, x = lora_bert(), token_ids(batch=8)
    labels = torch.arange(8) % 3
    base = copy.deepcopy(model)
    space = enter_subspace(model, 50, "fastfood", seed=0, said=said)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    losses = []
    for _ in range(20):
        loss = model(x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    space.bake()
    assert subspace_of(model) is None and SUBSPACE_ATTR not in dict(model.named_modules())
    with torch.no_grad():
        trained = model(x).logits
        assert not close(trained, base(x).logits)
    assert set(model.state_dict()) == set(base.state_dict())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in base.named_parameters() if p.requires_grad}
    dt.save(model, tmp_path / "adapter")
    fresh = tiny_bert()
    dt.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert close(fresh.eval()(x).logits, trained)


def test_discard_restores_theta0() -> None:
    model, x = lora_bert(), token_ids()
    before = state_hash(model)
    space = enter_subspace(model, 10, "dense")
    with torch.no_grad():
        space.z.fill_(1.0)
        model(x)  # syncs theta into the parameters
    assert state_hash(model) != before
    space.discard()
    assert state_hash(model) == before
    with pytest.raises(TrainingError, match="already been baked or discarded"):
        space.bake()
    assert state_hash(model) == before


# -- errors --------------------------------------------------------------------------------------

def trainable_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dim": 0}, "must be >= 1"),
    ({"dim": -3}, "must be >= 1"),
    ({"dim": 10**9}, "exceeds D="),
    ({"dim": 2.5}, "must be an integer"),
    ({"dim": 10, "projection": "qr"}, "must be one of"),
    ({"dim": 3, "said": True}, "per-tensor scales"),
])
def test_bad_options_are_refused_and_leave_the_model_unchanged(kwargs: dict[str, object], match: str) -> None:
    model = lora_bert()
    before, flags = state_hash(model), trainable_flags(model)
    with pytest.raises(ConfigError, match=match):
        enter_subspace(model, **kwargs)  # type: ignore[arg-type]
    assert state_hash(model) == before and trainable_flags(model) == flags and subspace_of(model) is None


def test_a_model_without_trainable_parameters_and_a_second_subspace_are_refused() -> None:
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        enter_subspace(frozen, 2)
    model = nn.Linear(3, 3)
    enter_subspace(model, 2)
    with pytest.raises(TrainingError, match="already trains in a subspace"):
        enter_subspace(model, 2)


# -- d90 -----------------------------------------------------------------------------------------

def test_d90_takes_the_smallest_d_whose_mean_over_seeds_reaches_90_percent() -> None:
    rows: list[dict[str, Any]] = [
        {"options": {"intrinsic_dim": 0, "seed": 0}, "metrics": {"accuracy": 0.90}},  # the reference run
        {"options": {"intrinsic_dim": 10, "seed": 0}, "metrics": {"accuracy": 0.85}},  # mean 0.75: below 0.81
        {"options": {"intrinsic_dim": 10, "seed": 1}, "metrics": {"accuracy": 0.65}},
        {"options": {"intrinsic_dim": 100, "seed": 0}, "metrics": {"accuracy": 0.80}},  # mean 0.82
        {"options": {"intrinsic_dim": 100, "seed": 1}, "metrics": {"accuracy": 0.84}},
        {"intrinsic_dim": 1000, "accuracy": 0.9},  # flat rows work too
        {"options": {"intrinsic_dim": 50}, "metrics": {}},  # a failed cell: no metric
    ]
    assert d90(rows, "accuracy", reference=0.90) == 100
    by_rate = [{"cell": f"intrinsic_dim=10,lr={lr}", "seed": seed, "options": {"intrinsic_dim": 10, "lr": lr},
                "metrics": {"accuracy": accuracy}}
               for lr, seed, accuracy in ((0.1, 0, 0.5), (0.1, 1, 0.6), (0.3, 0, 0.85), (0.3, 1, 0.83))]
    assert d90(rows + by_rate, "accuracy", reference=0.90) == 10  # d=10 at its best rate: mean 0.84 >= 0.81
    assert d90(by_rate[:2], "accuracy", reference=0.90) is None  # the other rate alone: mean 0.55
    assert d90(rows, "accuracy", reference=0.90, fraction=0.99) == 1000
    assert d90(rows, "accuracy", reference=2.0) is None
    assert d90([], "accuracy", reference=0.9) is None


# -- the trainer ---------------------------------------------------------------------------------

def run_options(model: Path, data: Path, out: Path, **extra: object) -> dict[str, object]:
    return {"model": str(model), "train_file": str(data), "output_dir": str(out), "progress": False,
            "batch_size": 16, "max_length": 32, "threads": 1, "target_modules": ["query", "value"],
            "max_steps": 12, "lr": 0.05, "intrinsic_dim": 64, **extra}


@pytest.mark.usefixtures("keep_thread_count")
def test_a_run_trains_in_the_subspace_records_d_and_D_and_saves_a_loadable_adapter(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    from safetensors.torch import load_file

    from deltatune.train.run import rebuild, train_run

    lines: list[str] = []
    run, train = split_options(run_options(tiny_bert_dir, sentiment_file, tmp_path, projection="dense",
                                           save_every=6))
    result = train_run(run, train, say=lines.append)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert result.metrics["intrinsic_dim"] == 64
    assert result.metrics["intrinsic_params"] == sum(t.numel() for t in saved.values())  # D: the adapter and head
    assert any(line.startswith("intrinsic subspace: d=64 of D=") for line in lines)
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)  # B starts at 0: the run moved it
    assert (tmp_path / "checkpoints" / "step-0000012").is_dir()
    model, _, options = rebuild(tmp_path)
    assert options.intrinsic_dim == 64 and options.projection == "dense"
    assert subspace_of(model) is None


@pytest.mark.usefixtures("keep_thread_count")
@pytest.mark.parametrize("extra", [{"resume": True}, {"gradient_checkpointing": True}])
def test_a_run_refuses_what_the_subspace_cannot_do_before_writing(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path, extra: dict[str, object]) -> None:
    from deltatune.train.run import train_run

    run, train = split_options(run_options(tiny_bert_dir, sentiment_file, tmp_path, **extra))
    with pytest.raises(ConfigError, match="cannot be combined with --intrinsic-dim"):
        train_run(run, train, say=lambda _: None)
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "adapter").exists()


def test_the_options_check_d() -> None:
    with pytest.raises(ConfigError, match="intrinsic_dim"):
        split_options({"intrinsic_dim": -1})
    with pytest.raises(ConfigError, match="projection"):
        split_options({"projection": "sparse"})


def test_evaluation_in_inference_mode_after_a_step_sees_the_new_theta() -> None:
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 4)
    theta0 = trainable_vector(model)
    space = enter_subspace(model, 5, "dense", seed=1)
    assert isinstance(space.projection, DenseGaussian)
    optimizer = torch.optim.SGD([space.z], lr=0.1)
    model(x).square().sum().backward()
    optimizer.step()  # z changed; nothing has written theta yet
    with torch.inference_mode():
        model(x)
    expected = theta0 + space.projection.matrix().double() @ space.z.detach().double()
    assert torch.allclose(trainable_vector_of(model, space), expected, atol=1e-6)
