"""``NAME=FOLDER`` items naming saved adapters, read once for every recipe built on earlier runs
(``methods.named_folders``): the table runs through the parser itself and through the AdapterFusion
and X-LoRA recipes' readers, which must accept and refuse the same items with the same words.
What only one recipe does (a name the fusion reserves, X-LoRA's expert check) is tested with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import deltatune as dt
from conftest import tiny_llama
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.methods import fusion_recipe, xlora_recipe
from deltatune.methods.fusion_recipe import members
from deltatune.methods.named_folders import named_adapter_folders
from deltatune.methods.xlora_recipe import experts

Reader = Callable[[Sequence[str]], dict[str, Path]]
READERS: dict[str, tuple[str, str, Reader]] = {  # option, the fix it gives, the reader
    "parser": ("items", "pass two folders", lambda items: named_adapter_folders("items", items, "a test",
                                                                                "pass two folders")),
    "fusion": ("fuse", fusion_recipe.FIX, lambda items: members({"fuse": tuple(items)})),
    "xlora": ("xlora_experts", xlora_recipe.FIX, lambda items: experts({"xlora_experts": tuple(items)})),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real saved LoRA adapters of the tiny LLaMA: one in a run folder's ``adapter/``, one on its own."""
    root = tmp_path_factory.mktemp("named")
    for seed, folder in enumerate((root / "run_a" / "adapter", root / "plain_b")):
        dt.save(dt.attach(tiny_llama(seed), dt.LoraConfig(r=2, target_modules=["q_proj"])), folder)
    return {"RUN": root / "run_a", "ADAPTER": root / "plain_b", "missing": root / "nothing"}


def _items(given: Sequence[str], folders: dict[str, Path]) -> list[str]:
    """``NAME=KEY`` / ``KEY`` with KEY replaced by the fixture's folder."""
    return [f"{n}={folders[k]}" if sep else str(folders[n]) for n, sep, k in (i.partition("=") for i in given)]


@pytest.mark.parametrize("given, expected", [
    (["a=RUN", "b=ADAPTER"], {"a": "run_a/adapter", "b": "plain_b"}),
    (["RUN", "ADAPTER"], {"run_a": "run_a/adapter", "plain_b": "plain_b"}),  # a run is named after its folder
    (["b=ADAPTER", "a=RUN"], {"b": "plain_b", "a": "run_a/adapter"}),  # the order given is kept
])
@pytest.mark.parametrize("reader", READERS)
def test_items_name_the_adapter_folders(reader: str, given: list[str], expected: dict[str, str],
                                        folders: dict[str, Path]) -> None:
    got = READERS[reader][2](_items(given, folders))
    root = folders["RUN"].parent.resolve()
    assert {name: path.relative_to(root).as_posix() for name, path in got.items()} == expected
    assert list(got) == list(expected) and all(path.is_absolute() for path in got.values())


@pytest.mark.parametrize("given, message, fix", [
    (["a=RUN"], "needs two or more adapter folders, 1 given", None),
    ([], "needs two or more adapter folders, 0 given", None),
    (["a=RUN", "b=missing"], "holds no adapter_config.json (nor adapter/adapter_config.json)", None),
    (["a=RUN", "a=ADAPTER"], "the name 'a' is taken by another folder of this option", "give each folder its own name: NAME=FOLDER"),
    (["RUN", "run_a=ADAPTER"], "the name 'run_a' is taken by another folder of this option", "give each folder its own name: NAME=FOLDER"),
    (["a.b=RUN", "b=ADAPTER"], "adapter name 'a.b' is invalid", "prefix the folder with a name: NAME=FOLDER"),
    (["=RUN", "b=ADAPTER"], "adapter name '' is invalid", "prefix the folder with a name: NAME=FOLDER"),
])
@pytest.mark.parametrize("reader", READERS)
def test_bad_items_are_refused_alike(reader: str, given: list[str], message: str, fix: str | None,
                                     folders: dict[str, Path]) -> None:
    option, own_fix, read = READERS[reader]
    with pytest.raises(ConfigError) as refused:
        read(_items(given, folders))
    assert refused.value.config == "options" and refused.value.field == option
    assert message in str(refused.value)
    assert str(refused.value).endswith(f"Fix: {fix or own_fix}.")


def test_reserved_names_and_the_check_are_the_callers(folders: dict[str, Path]) -> None:
    items = _items(["default=RUN", "b=ADAPTER"], folders)
    with pytest.raises(ConfigError, match="the name 'default' is the name the fusion itself gets"):
        members({"fuse": tuple(items)})
    assert list(experts({"xlora_experts": tuple(items)})) == ["default", "b"]  # X-LoRA attaches no expert by name

    def refuse(name: str, folder: Path) -> None:
        raise AdapterFileError(f"{folder} is not wanted as {name!r}")

    with pytest.raises(ConfigError, match="is not wanted as 'default'.*Fix: pass two folders"):
        named_adapter_folders("items", items, "a test", "pass two folders", check=refuse)
