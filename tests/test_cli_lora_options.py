"""`deltatune train`'s LoRA options: ``--init-lora-weights`` (PiSSA / OLoRA / gaussian) and
``--loraplus-lr-ratio`` (LoRA+), on the tiny BERT.

Oracles: peft (a PiSSA run's saved adapter loaded by ``PeftModel.from_pretrained``), a residual base
computed here with torch's own SVDs, ``dt.loraplus_optimizer`` (the trainer's groups and one step), and
transformers (a merged run folder).
"""

from __future__ import annotations

import copy
import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama, token_ids, train_command
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.methods.lora_init import seeded_svd_lowrank
from deltatune.registry import param_groups_for
from deltatune.train import TrainConfig
from deltatune.train import trainer as trainer_module
from deltatune.train.prepare import make_optimizer, trainable
from deltatune.train.run import rebuild

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

TARGETS = ("--target-modules", "query", "value")  # PiSSA needs linear layers: no word_embeddings here
SENTENCES = ["a good day", "the worst food", "fine"]


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_command(model, data, out, *TARGETS, *extra, options=("--lr", "1e-2"))


def logits(model: nn.Module, bert_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(bert_dir)(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def base_classifier(bert_dir: Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2).eval()


def adapted_weights(model: nn.Module, targets: tuple[str, ...] = ("query", "value")) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def residual(weight: torch.Tensor, r: int, init: str) -> torch.Tensor:
    """W less its top-r part, computed with torch's SVDs (``pissa_niter_K``: ``torch.svd_lowrank`` right
    after ``torch.manual_seed(0)``, deltatune's documented seed)."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return weight - (u[:, :r] * s[:r]) @ vh[:r]
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(weight, r, niter=int(init.rsplit("_", 1)[1]))
    return weight - (u * s) @ v.t()


@pytest.fixture(scope="module", params=["pissa", "pissa_niter_2"])
def pissa_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path,
              sentiment_file: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    assert main(train_args(tiny_bert_dir, sentiment_file, out, "--init-lora-weights", request.param,
                           "--max-steps", "20")) == 0
    return out, request.param


def test_pissa_run_saves_its_init_and_trains_the_factors(pissa_run: tuple[Path, str], tiny_bert_dir: Path) -> None:
    out, init = pissa_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == init and config["r"] == 8
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    for name, layer in adapted_weights(base_classifier(tiny_bert_dir)).items():
        a, b = (saved[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        start = layer.weight.detach() - residual(layer.weight.detach(), 8, init)  # s B0 A0: W's top-r part
        assert not torch.allclose(scale * b @ a, start, atol=1e-4), f"{name}: training did not move the factors"


def test_rebuild_equals_the_residual_base_plus_the_saved_adapter(pissa_run: tuple[Path, str], tiny_bert_dir: Path,
                                                                 tmp_path: Path) -> None:
    """eval / predict / merge rebuild W_res + s B A with the residual training started from: here W_res
    comes from torch's SVDs and the adapter is loaded by peft as a plain LoRA over it."""
    from peft import PeftModel

    out, init = pissa_run
    plain = tmp_path / "plain"
    shutil.copytree(out / "adapter", plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    base = base_classifier(tiny_bert_dir)
    with torch.no_grad():
        for layer in adapted_weights(base).values():
            layer.weight.copy_(residual(layer.weight, 8, init))
    expected = logits(PeftModel.from_pretrained(base, plain), tiny_bert_dir)
    model, _, _ = rebuild(out)
    assert torch.allclose(logits(model, tiny_bert_dir), expected, atol=1e-5)
    assert torch.allclose(logits(rebuild(out)[0], tiny_bert_dir), expected, atol=1e-5)  # the same every time


def test_peft_loads_a_pissa_run_to_the_same_outputs(pissa_run: tuple[Path, str], tiny_bert_dir: Path) -> None:
    """peft's convention: the saved config keeps init_lora_weights="pissa", and loading onto the original
    base re-derives the residual (exact SVD). For pissa_niter_K peft draws from its global generator, so
    only the exact init is compared."""
    from peft import PeftModel

    out, init = pissa_run
    if init != "pissa":
        pytest.skip("peft re-derives pissa_niter_K from an unseeded randomized SVD")
    model, _, _ = rebuild(out)
    loaded = PeftModel.from_pretrained(base_classifier(tiny_bert_dir), out / "adapter")
    assert torch.allclose(logits(loaded, tiny_bert_dir), logits(model, tiny_bert_dir), atol=1e-5)


def test_eval_and_merge_of_a_pissa_run(pissa_run: tuple[Path, str], tiny_bert_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    out, _ = pissa_run
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "eval"
    assert json.loads(capsys.readouterr().out)["accuracy"] == final["accuracy"]  # the model training ended with
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged, tiny_bert_dir), logits(rebuild(out)[0], tiny_bert_dir), atol=1e-5)


def test_seeded_randomized_svd_is_torchs_after_seed_0() -> None:
    for shape in [(16, 32), (32, 16)]:
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(weight, 4, niter=2)
        torch.manual_seed(123)  # the global generator's state does not matter
        ours = seeded_svd_lowrank(weight, 4, 2)
        assert all(torch.equal(x, y) for x, y in zip(ours, (u, s, v.t())))


def test_pissa_niter_save_load_rederives_the_same_base(tmp_path: Path) -> None:
    model = dt.attach(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights="pissa_niter_2"))
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.05 * torch.randn_like(p))  # "training"
        expected = model(token_ids()).logits
    dt.save(model, tmp_path)
    torch.manual_seed(99)
    with torch.no_grad():
        assert torch.equal(dt.load(tiny_llama(), tmp_path)(token_ids()).logits, expected)


# ------------------------------------------------------------------------------------------ LoRA+

Group = tuple[str, list[str], float, float]


def describe(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[Group]:
    """(name, member parameter names in order, lr, weight decay) per group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], [names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
            for g in optimizer.param_groups]


def test_loraplus_run_builds_loraplus_groups_and_steps_as_it(tmp_path: Path, tiny_bert_dir: Path,
                                                             sentiment_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's optimizer has dt.loraplus_optimizer's groups (names, members, lr, weight decay), and
    its step, given the same gradients, gives the same parameters, bit for bit."""
    seen: dict[str, Any] = {}

    def recording(model: nn.Module, config: TrainConfig, groups: Any = None) -> torch.optim.Optimizer:
        optimizer = make_optimizer(model, config, groups)
        twin = copy.deepcopy(model)
        reference = dt.loraplus_optimizer(twin, config.lr, 16.0, weight_decay=config.weight_decay)
        seen.update(model=model, twin=twin, start=copy.deepcopy(model), groups=describe(optimizer, model),
                    reference=describe(reference, twin))
        step = optimizer.step

        def both_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            for mine, theirs in zip(trainable(model), trainable(twin), strict=True):
                theirs.grad = None if mine.grad is None else mine.grad.clone()
            reference.step()
            return step(*args, **kwargs)

        # bound, as the scheduler expects when it wraps step
        optimizer.step = types.MethodType(both_step, optimizer)  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", recording)
    args = train_command(tiny_bert_dir, sentiment_file, tmp_path, "--loraplus-lr-ratio", "16", "--max-steps", "1",
                         "--warmup-ratio", "0", "--schedule", "constant", "--lr", "1e-3", "--weight-decay", "0.1")
    assert main(args) == 0  # word_embeddings, query and value: the embedding, A and B groups all present
    groups = seen["groups"]
    assert [g[0] for g in groups] == ["loraplus_A", "loraplus_embedding", "loraplus_B", "loraplus_B_no_decay"]
    assert groups == seen["reference"]
    by_name = {g[0]: g for g in groups}
    assert by_name["loraplus_B"][2:] == (1e-3 * 16, 0.1) and by_name["loraplus_A"][2:] == (1e-3, 0.1)
    assert by_name["loraplus_embedding"][2] == 1e-6 and by_name["loraplus_B_no_decay"][3] == 0.0
    b_names = by_name["loraplus_B"][1]
    assert len(b_names) == 4 and all(n.endswith(("query.deltas.default.B", "value.deltas.default.B")) for n in b_names)
    assert by_name["loraplus_B_no_decay"][1] == ["bert.pooler.copies.default.dense.bias",
                                                 "classifier.copies.default.bias"]
    moved = [not torch.equal(p, q) for p, q in zip(trainable(seen["model"]), trainable(seen["start"]), strict=True)]
    assert any(moved), "the step changed nothing"
    for mine, theirs in zip(trainable(seen["model"]), trainable(seen["twin"]), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("recipe", ["lora", "dora"])
def test_param_groups_for_a_recipe(recipe: str) -> None:
    model = dt.attach(tiny_llama(), dt.LoraConfig(r=4, use_dora=recipe == "dora", target_modules=("embed_tokens",
                                                                                                   "q_proj", "v_proj")))
    config = TrainConfig(lr=2e-3, weight_decay=0.05)
    plain = make_optimizer(model, config, param_groups_for(recipe, {"loraplus_lr_ratio": 0.0}))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["params"] == trainable(model)
    plus = make_optimizer(model, config, param_groups_for(recipe, {"loraplus_lr_ratio": 8.0}))
    expected = dt.loraplus_optimizer(model, 2e-3, 8.0, weight_decay=0.05)
    assert describe(plus, model) == describe(expected, model)


# ---------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("extra", "words"), [
    (("--init-lora-weights", "bogus"), "must be one of true, gaussian, pissa, pissa_niter_K"),
    (("--init-lora-weights", "false"), "Python API only"),
    (("--init-lora-weights", "loftq", "--quantize", "nf4"), "LoftQ must see the full-precision weight"),
    (("--init-lora-weights", "pissa", "--quantize", "nf4"), "(--quantize nf4) cannot hold"),
    (("--init-lora-weights", "olora", "--target-modules", "word_embeddings", "query"), "needs a linear layer"),
    (("--loraplus-lr-ratio", "-1"), "loraplus_lr_ratio=-1.0 is invalid: must be >= 0"),
    # a method option the chosen method never reads is an error, not a silent no-op
    (("--method", "vera", "--loraplus-lr-ratio", "16"), "--method vera does not use --loraplus-lr-ratio"),
    (("--method", "bitfit", "--r", "16", "--reduction-factor", "4"), "--method bitfit does not use --r, --reduction-factor"),
    (("--method", "pfeiffer", "--init-lora-weights", "pissa"), "--method pfeiffer does not use --init-lora-weights"),
    (("--method", "parallel", "--adapter-scaling", "big"), "scaling='big' is invalid: it must be a finite number, 'learned' or"),
    (("--method", "parallel", "--adapter-scaling", "nan"), "scaling=nan is invalid: it must be a finite number"),
    (("--method", "lora", "--adapter-scaling", "2"), "--method lora does not use --adapter-scaling"),
    (("--quant-group-size", "32"), "only applies with --quantize int4_group"),
])
def test_bad_values_exit_2_and_leave_no_run_folder(extra: tuple[str, ...], words: str, tmp_path: Path,
                                                   tiny_bert_dir: Path, sentiment_file: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(tiny_bert_dir, sentiment_file, out, *extra, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not out.exists()
