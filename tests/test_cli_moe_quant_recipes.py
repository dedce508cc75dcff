"""QA-LoRA and X-LoRA from the command line on the tiny BERT: ``--method qalora`` over an
``--quantize int4_group`` base (its merge into the 4-bit base is lossless, ``deltatune merge``
writes the dense merge) and ``--method xlora --xlora-experts NAME=RUN ...`` over LoRA runs; the
run folders rebuild for eval and predict, and bad choices stop before the run folder is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import train_command
from deltatune.cli import main
from deltatune.methods.xlora import XLoraPart
from deltatune.quant import Int4GroupLinear, load_quantized, save_quantized
from deltatune.state import state_of
from deltatune.train.run import rebuild

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("keep_thread_count")]

QA = ("--method", "qalora", "--quantize", "int4_group", "--quant-group-size", "16", "--qalora-group-size", "32")


def args(model: Path, data: Path, out: Path, *extra: str, steps: str = "8") -> list[str]:
    """``train_command`` with LoRA targets the tiny BERT's linear layers only (query, value)."""
    command = train_command(model, data, out, options=("--lr", "1e-2", "--max-steps", steps))
    return [*command[:command.index("--target-modules")], "--target-modules", "query", "value", *extra]


def plain_name(key: str) -> str:
    """A module's name once the adapters are unloaded (no wrapper, the active copy of a saved module)."""
    return key.replace(".base_layer", "").replace(".copies.default", "")


def batch(run: Path) -> dict[str, torch.Tensor]:
    _, task, _ = rebuild(run)
    return dict(task.tokenizer(["a good day", "the worst food"], return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def qalora_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("qalora")
    assert main(args(tiny_bert_dir, sentiment_file, out, *QA)) == 0
    return out


def test_a_qalora_run_trains_over_an_int4_group_base(qalora_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((qalora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_qalora"] and config["qalora_group_size"] == 32
    model, _, _ = rebuild(qalora_run)
    groups = {m.group_size for m in model.modules() if isinstance(m, Int4GroupLinear)}
    assert groups == {16}
    capsys.readouterr()
    assert main(["eval", str(qalora_run)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_the_qalora_run_merges_into_its_4bit_base_losslessly_and_round_trips(qalora_run: Path, tmp_path: Path) -> None:
    model, task, _ = rebuild(qalora_run)
    codes = {plain_name(k): m.weight.clone() for k, m in model.named_modules()
             if isinstance(m, Int4GroupLinear) and ".original_module." not in k}
    inputs = batch(qalora_run)
    with torch.no_grad():
        adapted = model(**inputs).logits
        merged = dt.unload(model, merge=True, requantize=True)
        folded = merged(**inputs).logits
    layers = {k: m for k, m in merged.named_modules() if isinstance(m, Int4GroupLinear)}
    assert layers.keys() == codes.keys() and any(".query" in k for k in codes)
    assert all(torch.equal(layers[k].weight, v) for k, v in codes.items())  # the codes stay byte for byte
    assert torch.allclose(folded, adapted, atol=1e-5)
    save_quantized(merged, tmp_path / "merged.safetensors")
    fresh = load_quantized(task.load_model(json.loads((qalora_run / "run.json").read_text())["model"]),
                           tmp_path / "merged.safetensors").eval()
    again = {k: m for k, m in fresh.named_modules() if isinstance(m, Int4GroupLinear)}
    assert again.keys() == layers.keys()
    for key, layer in layers.items():
        assert all(torch.equal(getattr(again[key], t), getattr(layer, t)) for t in ("weight", "scale", "offset"))
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, folded)


def test_deltatune_merge_writes_the_qalora_run_dense(qalora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    assert main(["merge", str(qalora_run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, _, _ = rebuild(qalora_run)
    inputs = batch(qalora_run)
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (("--method", "qalora"), "pass --quantize int4_group"),
    (("--method", "qalora", "--quantize", "nf4"), "pass --quantize int4_group"),
    (("--method", "qalora", "--quantize", "int4_group", "--quant-group-size", "16", "--qalora-group-size", "24"),
     "must be a multiple of --quant-group-size 16"),
    (("--method", "qalora", "--quantize", "int4_group", "--quant-group-size", "16", "--qalora-group-size", "64"),
     "divides into groups of qalora_group_size=64"),
    (("--quantize", "int4_group", "--quant-group-size", "48"), "do not split into groups of 48"),
    (("--quantize", "int4_group", "--quant-group-size", "3"), "must be an even integer >= 2"),
])
def test_bad_qalora_choices_stop_before_the_run_folder_is_touched(extra: tuple[str, ...], message: str, tmp_path: Path,
                                                                  tiny_bert_dir: Path, sentiment_file: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, sentiment_file, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "run.json").exists()


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> dict[str, Path]:
    runs = {}
    for name, seed in (("a", "1"), ("b", "2")):
        out = tmp_path_factory.mktemp(name)
        assert main(args(tiny_bert_dir, sentiment_file, out, "--seed", seed)) == 0
        runs[name] = out
    return runs


@pytest.fixture(scope="module")
def xlora_run(experts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path,
              sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("xlora")
    with pytest.MonkeyPatch.context() as patch:  # relative expert paths: the run must still find them elsewhere
        patch.chdir(experts["a"].parent)
        given = [f"{name}={run.name}" for name, run in experts.items()]
        assert main(args(tiny_bert_dir, sentiment_file, out, "--method", "xlora", "--xlora-experts", *given)) == 0
    return out


def test_the_xlora_run_saves_its_classifier_and_head_over_the_experts(xlora_run: Path,
                                                                       experts: dict[str, Path]) -> None:
    config = json.loads((xlora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["hidden_size"] == 32
    assert config["adapters"] == {name: f"xlora_experts/{name}" for name in experts}  # copies, named relatively
    for name, run in experts.items():
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (xlora_run / "adapter" / "xlora_experts" / name / file).read_bytes() == \
                (run / "adapter" / file).read_bytes()
    assert "classifier" in config["modules_to_save"]  # the task's head, a new copy trained with the classifier
    saved = load_file(xlora_run / "adapter" / "adapter_model.safetensors")
    owners = ("base_model.internal_xlora_classifier.", *(f"base_model.model.{m}." for m in config["modules_to_save"]))
    assert saved and all(k.startswith(owners) for k in saved)
    assert not any("lora_A" in k or "lora_B" in k for k in saved)  # the experts are not copied: they stay frozen


def test_the_rebuilt_xlora_run_mixes_the_experts_unchanged(xlora_run: Path, experts: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # another working directory than the run's
    model, _, _ = rebuild(xlora_run)
    part = state_of(model).model_deltas["default"]
    assert isinstance(part, XLoraPart)
    for e, run in enumerate(experts.values()):
        files = load_file(run / "adapter" / "adapter_model.safetensors")
        for i, key in enumerate(part.order):
            layer = part.experts[str(i)]
            for side in ("A", "B"):
                assert torch.equal(getattr(layer, f"{side}_{e}"), files[f"base_model.model.{key}.lora_{side}.weight"])
    inputs = batch(xlora_run)
    with torch.no_grad():
        mixed = model(**inputs).logits
        scalings = part.scalings
        with dt.disabled(model):
            head_only = model(**inputs).logits
    assert scalings is not None and scalings.shape[-1] == 2
    assert torch.allclose(scalings.sum(-1), torch.ones(()))  # softmax over the two experts
    assert not torch.allclose(mixed, head_only)


def test_eval_and_predict_read_the_xlora_run(xlora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(xlora_run)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    assert main(["predict", str(xlora_run), "--text", "the food was great"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prediction"] in ("negative", "positive")


def test_a_copied_run_folder_rebuilds_without_the_expert_runs(xlora_run: Path, experts: dict[str, Path],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder copied to another place evaluates and predicts the same with the expert runs gone,
    and no file of its adapter names the expert runs' folders."""
    model, _, _ = rebuild(xlora_run)
    inputs = batch(xlora_run)
    capsys.readouterr()
    assert main(["eval", str(xlora_run)]) == 0
    evaluated = capsys.readouterr().out
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(xlora_run, copy)
    away = {name: tmp_path / "away" / name for name in experts}
    try:
        for name, run in experts.items():  # the expert runs are gone while the copy is read
            shutil.move(run, away[name])
        again, _, _ = rebuild(copy)
        with torch.no_grad():
            assert torch.equal(again(**inputs).logits, model(**inputs).logits)
        assert main(["eval", str(copy)]) == 0
        assert capsys.readouterr().out == evaluated
    finally:
        for name, run in experts.items():
            shutil.move(away[name], run)
    files = [p.read_bytes() for p in (copy / "adapter").rglob("*") if p.is_file()]
    assert files and not any(str(run.resolve()).encode() in data for run in experts.values() for data in files)


@pytest.mark.parametrize("given, message", [
    (["a=A", "b=DORA"], "sets use_dora=True"),
    (["a=A", "b=QA"], "sets use_qalora=True"),
])
def test_an_unsupported_expert_stops_before_the_run_folder_is_touched(given: list[str], message: str,
                                                                      experts: dict[str, Path], qalora_run: Path,
                                                                      tmp_path: Path, tiny_bert_dir: Path,
                                                                      sentiment_file: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--xlora-experts is read as every such option is (test_named_folders); what only X-LoRA refuses is
    an expert that is not plain LoRA, by the check its attach runs too (test_xlora)."""
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    folders = {"A": experts["a"], "DORA": dora, "QA": qalora_run}
    values = [item.rpartition("=")[0] + "=" + str(folders[item.rpartition("=")[2]]) for item in given]
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, sentiment_file, out, "--method", "xlora", "--xlora-experts", *values)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_merge_refuses_the_xlora_run(xlora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(xlora_run), "--output", str(tmp_path / "merged")]) == 2
    assert "change activations, not weights" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
