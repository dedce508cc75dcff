"""Poly (Polytropon): peft parity both ways, task ids on forward and generate, init, refusals.

peft's PolyModel is the oracle: the same weights and task ids give the same outputs (eval mode,
deterministic; and in training mode with the same seed, whose relaxed-Bernoulli draws then agree),
a peft folder loads with dt.load and ours loads in peft with equal keys, tensors and config.
peft is only imported here, as a test oracle.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import perturb, state_hash, tiny_llama, tiny_t5, token_ids
from deltatune.errors import AdapterError, ConfigError, TargetError

import peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASKS = torch.tensor([0, 2, 1])

CASES = [
    pytest.param(tiny_llama, {"r": 2, "n_tasks": 3, "n_skills": 4, "n_splits": 2, "target_modules": ["q_proj", "down_proj"],
                              "task_type": "CAUSAL_LM"}, id="llama-multi-head-routing"),
    pytest.param(tiny_t5, {"r": 4, "n_tasks": 3, "n_skills": 2, "task_type": "SEQ_2_SEQ_LM"}, id="t5-default-targets"),
]


def run(model: nn.Module, ids: Tensor, tasks: Tensor, peft_model: bool = False) -> Tensor:
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    extra: dict[str, Any] = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    return model(ids, task_ids=tasks, **extra).logits


@pytest.mark.parametrize(("factory", "kwargs"), CASES)
def test_peft_parity_both_ways(factory: Any, kwargs: dict[str, Any], tmp_path: Path) -> None:
    base, ids = factory(), token_ids(batch=3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(**copy.deepcopy(kwargs)))
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = dt.load(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        want = run(theirs, ids, TASKS)
        assert torch.equal(run(ours, ids, TASKS), want)  # the same operations in the same order
        other = run(ours, ids, torch.tensor([1, 1, 0]))
    assert (other - want).abs().max() > 1e-3, "the task ids must change the output, or the test proves nothing"

    dt.save(ours, tmp_path / "ours")
    mine, peft_file = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("ours", "peft"))
    assert mine.keys() == peft_file.keys() and all(torch.equal(mine[k], peft_file[k]) for k in mine)
    mine_json, peft_json = (json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("ours", "peft"))
    for config in (mine_json, peft_json):
        config.pop("peft_version", None)
        config["target_modules"] = sorted(config["target_modules"])
    assert mine_json.keys() == peft_json.keys() and mine_json == {**peft_json, "auto_mapping": mine_json["auto_mapping"]}
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(run(back, ids, TASKS), want)


def peft_and_ours(config: dict[str, Any], folder: Path) -> tuple[nn.Module, nn.Module]:
    """A perturbed peft Poly model on a tiny LLaMA and the same adapter loaded by deltatune from its folder."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(**config))
    perturb(theirs)
    theirs.save_pretrained(folder)
    return theirs, dt.load(copy.deepcopy(base), folder, trainable=True)


GENERATE = {"r": 2, "n_tasks": 3, "n_skills": 2, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def test_generate_takes_task_ids_as_peft_does(tmp_path: Path) -> None:
    theirs, ours = peft_and_ours(GENERATE, tmp_path)
    ids, settings = token_ids(batch=3), {"max_new_tokens": 4, "do_sample": False}
    want = theirs.eval().generate(input_ids=ids, task_ids=TASKS, **settings)
    assert torch.equal(ours.eval().generate(ids, task_ids=TASKS, **settings), want)
    # beams (peft's bmm refuses them): each row's task is repeated in place, so a batch equals its rows alone
    beams = ours.generate(ids, task_ids=TASKS, num_beams=2, **settings)
    for row in range(3):
        alone = ours.generate(ids[row:row + 1], task_ids=TASKS[row:row + 1], num_beams=2, **settings)
        assert torch.equal(beams[row:row + 1], alone)


def test_fresh_adapter_equals_peft_init_for_the_same_seed() -> None:
    base = tiny_llama()
    config = {"r": 2, "n_tasks": 2, "n_skills": 3, "n_splits": 2, "target_modules": ["k_proj", "up_proj"]}
    for init in (True, False):
        torch.manual_seed(7)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(init_weights=init, **config))
        torch.manual_seed(7)
        ours = dt.attach(copy.deepcopy(base), dt.PolyConfig(init_weights=init, **config))
        want = {k.removeprefix("base_model.model.").replace(".default", ""): v
                for k, v in theirs.state_dict().items() if "poly_" in k}
        got = {k.replace(".deltas.default", ""): v for k, v in ours.state_dict().items() if "poly_" in k}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert all(bool((v == 0).all()) == (init and "lora_B" in k) for k, v in got.items())


def test_training_mode_noise_and_gradients_match_peft(tmp_path: Path) -> None:
    """Relaxed-Bernoulli mixing in training: with one seed both draw the same noise in the same order."""
    theirs, ours = peft_and_ours(GENERATE, tmp_path)
    ids = token_ids(batch=3)
    outputs, grads = [], []
    for model in (theirs.train(), ours.train()):
        torch.manual_seed(11)
        out = run(model, ids, TASKS)
        logits = [p for n, p in model.named_parameters() if n.endswith("module_logits")]
        grads.append(torch.autograd.grad(out.square().mean(), logits))
        outputs.append(out)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    torch.manual_seed(12)
    assert (run(ours, ids, TASKS) - outputs[1]).abs().max() > 0  # noisy: another draw, another output
    assert all(torch.allclose(a, b, atol=1e-7) and a.abs().max() > 0 for a, b in zip(*grads))


def poly_model(**changes: Any) -> tuple[nn.Module, nn.Module]:
    base = tiny_llama()
    config = dt.PolyConfig(**{"r": 2, "n_tasks": 3, "n_skills": 2, "target_modules": ["q_proj", "v_proj"],
                              "init_weights": False, **changes})
    return base, dt.attach(copy.deepcopy(base), config, name="poly")


def test_task_ids_are_required_checked_and_scoped() -> None:
    base, model = poly_model()
    ids = token_ids(batch=3)
    with torch.no_grad():
        with pytest.raises(AdapterError, match="no task ids"):
            model(ids)
        with pytest.raises(AdapterError, match="out of range"):
            model(ids, task_ids=torch.tensor([0, 3, 1]))
        with pytest.raises(AdapterError, match="one task id per row"):
            model(ids, task_ids=torch.tensor([0, 1]))
        with pytest.raises(AdapterError, match="non-negative integer"):
            model(ids, task_ids=torch.tensor([0.0, 1.0, 1.0]))
        with dt.poly_tasks(model, TASKS):
            scoped = model(ids).logits
        assert torch.equal(scoped, model(ids, task_ids=TASKS).logits)
        with pytest.raises(AdapterError, match="no task ids"):
            model(ids)  # the block's ids are gone
        with dt.disabled(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        with pytest.raises(AdapterError, match="no adapter on this model takes task ids"):
            dt.attach(copy.deepcopy(base), dt.LoraConfig(target_modules=["q_proj"]))(ids, task_ids=TASKS)


def test_mixed_batches_and_merging_are_refused_with_the_model_unchanged() -> None:
    _, model = poly_model()
    torch.manual_seed(3)
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), name="lora")
    dt.set_active(model, "poly")
    ids, before = token_ids(batch=3), state_hash(model)
    with torch.no_grad():
        with pytest.raises(AdapterError, match="only some rows"):
            with dt.routing(model, ["poly", "lora", None]):
                pass
        with pytest.raises(AdapterError, match="only some rows"):
            model(ids, task_ids=TASKS, adapter_names=["poly", None, "poly"])
        with pytest.raises(AdapterError, match="only some rows"):
            dt.set_active(model, dt.BatchSplit("poly", "lora", sizes=[1, 2]))
        assert dt.active_adapters(model) == ("poly",)
        with dt.routing(model, ["poly"] * 3):  # every row the Poly adapter: one whole batch
            routed = model(ids, task_ids=TASKS).logits
        assert torch.equal(routed, model(ids, task_ids=TASKS).logits)
        dt.set_active(model, ["poly", "lora"])  # a sum runs on whole batches
        summed = model(ids, task_ids=TASKS).logits
        assert (summed - routed).abs().max() > 1e-4
    with pytest.raises(AdapterError, match="no weight to fold"):
        dt.merge(model)
    assert state_hash(model) == before


def test_config_and_layer_checks() -> None:
    with pytest.raises(ConfigError, match="poly_type"):
        dt.PolyConfig(poly_type="mhr")
    with pytest.raises(ConfigError, match="n_skills"):
        dt.PolyConfig(n_skills=0)
    with pytest.raises(TargetError, match="n_splits=3"):
        poly_model(n_splits=3)  # 32 and 16 features do not split in 3
