"""AdapterFusion from the command line: ``--method fusion --fuse NAME=RUN ...`` loads earlier
bottleneck runs frozen, trains the fusion and a new task head, and the run folder rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import tiny_bert, token_ids, train_command
from deltatune.cli import main
from deltatune.layer import SavedModule
from deltatune.state import saved_modules, state_of
from deltatune.train.run import rebuild

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bottleneck_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``train_command`` without its LoRA targets (a bottleneck adapter attaches at sites)."""
    args = train_command(model, data, out, options=("--lr", "1e-2", "--max-steps", "8"))
    return [*args[:args.index("--target-modules")], *extra]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, sentiment_file: Path) -> dict[str, Path]:
    runs = {}
    for name, seed in (("a", "1"), ("b", "2")):
        out = tmp_path_factory.mktemp(name)
        assert main(bottleneck_args(tiny_bert_dir, sentiment_file, out, "--method", "pfeiffer", "--seed", seed)) == 0
        runs[name] = out
    return runs


@pytest.fixture(scope="module")
def fusion_run(members: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path,
               sentiment_file: Path) -> Path:
    out = tmp_path_factory.mktemp("fusion")
    fuse = [f"{name}={folder}" for name, folder in members.items()]
    assert main(bottleneck_args(tiny_bert_dir, sentiment_file, out, "--method", "fusion", "--fuse", *fuse)) == 0
    return out


def test_the_members_are_saved_with_the_fusion_unchanged(members: dict[str, Path], fusion_run: Path) -> None:
    for name, run in members.items():
        source = load_file(run / "adapter" / "adapter_model.safetensors")
        copied = load_file(fusion_run / "adapter" / name / "adapter_model.safetensors")
        assert source.keys() == copied.keys() and all(torch.equal(source[k], copied[k]) for k in source)
    config = json.loads((fusion_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapter_names"] == ["a", "b"]
    assert config["modules_to_save"]  # the fusion trains and saves its own task head


def test_the_rebuilt_run_computes_with_the_fusion_and_its_own_head(fusion_run: Path) -> None:
    model, _, _ = rebuild(fusion_run)
    assert state_of(model).active_set.composition == dt.Fuse("a", "b")
    heads = [module for _, module in saved_modules(model)]
    assert heads and all(h.current() is h.copies["default"] for h in heads)
    fusion_file = load_file(fusion_run / "adapter" / "adapter_model.safetensors")
    member_file = load_file(fusion_run / "adapter" / "a" / "adapter_model.safetensors")
    heads_saved = fusion_file.keys() & member_file.keys()  # file keys name a head copy by its module only
    assert heads_saved and all(not torch.equal(fusion_file[k], member_file[k]) for k in heads_saved)
    ids = token_ids()
    with torch.no_grad():
        fused = model(ids)[0]
        dt.set_active(model, "a")
        alone = model(ids)[0]
    assert not torch.allclose(fused, alone)  # the fusion (and its head) change the outputs


def test_eval_reads_the_fusion_run(fusion_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(fusion_run)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_a_bad_fuse_option_stops_before_the_run_folder_is_touched(members: dict[str, Path], tmp_path: Path,
                                                                 tiny_bert_dir: Path, sentiment_file: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--fuse is read as every such option is (test_named_folders); what only the fusion refuses is the
    name its own adapter gets."""
    fuse = [f"default={members['a']}", f"b={members['b']}"]
    out = tmp_path / "run"
    assert main(bottleneck_args(tiny_bert_dir, sentiment_file, out, "--method", "fusion", "--fuse", *fuse)) == 2
    assert "the name 'default' is the name the fusion itself gets" in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_a_fusion_head_serves_under_fuse_and_a_member_head_alone() -> None:
    model = tiny_bert()
    for name in ("a", "b"):
        dt.attach(model, dt.SeqBnConfig(reduction_factor=4, modules_to_save=["classifier"]), name=name)
    dt.set_active(model, dt.Fuse("a", "b"))  # the fusion is attached after its Fuse is active
    dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"], modules_to_save=["classifier"]), name="ab")
    head = model.get_submodule("classifier")
    assert isinstance(head, SavedModule)
    assert head.current() is head.copies["ab"]
    dt.set_active(model, "b")
    assert head.current() is head.copies["b"]
    dt.set_active(model, dt.Stack("a", "b"))  # no fusion runs: the first member's head
    assert head.current() is head.copies["a"]


def test_a_fusion_config_refuses_target_modules() -> None:
    with pytest.raises(dt.ConfigError, match="attaches at the architecture's sites"):
        dt.FusionConfig(adapter_names=["a", "b"], target_modules=["query"])


def test_a_fusion_with_its_own_head_is_not_saved_in_adapterhub_format(tmp_path: Path) -> None:
    model = tiny_bert()
    for name in ("a", "b"):
        dt.attach(model, dt.SeqBnConfig(reduction_factor=4), name=name)
    dt.attach(model, dt.FusionConfig(adapter_names=["a", "b"], modules_to_save=["classifier"]), name="ab")
    with pytest.raises(dt.AdapterFileError, match="format='peft'"):
        dt.save(model, tmp_path / "hub", names=["ab"], format="adapters")
    assert not (tmp_path / "hub").exists()
