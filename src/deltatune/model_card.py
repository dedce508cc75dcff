"""The README.md model card written beside every saved adapter, in the form peft's ``save_pretrained`` writes.

The Hub and llama.cpp's GGUF converter read the YAML front matter (``base_model``, ``library_name``,
``tags``). ``library_name`` is "peft": that is the library that loads the folder on the Hub; deltatune
is named in the tags. A README.md in the folder that deltatune did not write (it lacks ``MARK``) is the
user's: a save keeps it untouched, so no hand-written card is ever lost; delete it to get a fresh one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
MARK = "<!-- written by deltatune: a later dt.save rewrites this file; delete this line to keep your edits -->"
"""First line of the body of every card deltatune writes; a card without it belongs to the user."""


def should_write(folder: Path) -> bool:
    """Whether a save into ``folder`` writes the card: there is none yet, or deltatune wrote the one there."""
    path = folder / CARD_NAME
    if not path.is_file():
        return True
    try:
        return MARK in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # unreadable: not ours to replace


def card_text(config: dict[str, Any], name: str, library_version: str, transformers_model: bool) -> str:
    """The card for adapter ``name`` whose adapter_config.json content is ``config``."""
    base = config.get("base_model_name_or_path")
    method = str(config.get("peft_type", "")).lower()
    tags = sorted({"deltatune", "peft", *([method] if method else []),
                   *(["transformers"] if transformers_model else []),
                   *([f"base_model:adapter:{base}"] if base else [])})
    front = [*([f"base_model: {_yaml(base)}"] if base else []), "library_name: peft",
             *(["pipeline_tag: text-generation"] if config.get("task_type") == "CAUSAL_LM" else []),
             "tags:", *(f"- {_yaml(t)}" for t in tags)]
    body = [MARK, "", f"# {name}: {'an' if method[:1] in tuple('aeiou') else 'a'} {method or 'peft'} adapter", "",
            f"Adapter weights only, in peft's format, for the base model `{base or 'unknown (built in code)'}`.",
            "Load it with `dt.load(model, folder)` (deltatune), `PeftModel.from_pretrained(model, folder)` (peft), or",
            "`AutoModel...from_pretrained(folder)` (transformers, with peft installed and the base model reachable).",
            "", "### Framework versions", "", f"- deltatune {library_version}", ""]
    return "\n".join(["---", *front, "---", *body])


def _yaml(value: Any) -> str:
    """A YAML scalar: JSON's double-quoted strings are valid YAML and need no YAML library."""
    return json.dumps(str(value))
