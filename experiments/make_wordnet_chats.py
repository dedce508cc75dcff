"""Write the WordNet definition chats that the SmolLM2 sweeps train and evaluate on.

``deltatune train --task causal-lm`` reads ``prompt`` + ``completion`` or ``messages`` rows; WordNet's
``glosses.jsonl`` holds synsets (``words``, ``definition``, ``split``), so the chats are made here, the
way ``examples/finetune_smollm2.py`` makes them: one-word lemmas (no ``_`` or space) whose definition is
at most 90 characters, "Define the word 'X'." -> the definition, the ``train`` split shuffled with seed 0
and the ``validation`` split with seed 1 (the example's first rows are this file's first rows).

One JSONL file holds both splits (a ``split`` column), for ``--train-file FILE --eval-split validation``::

    python experiments/make_wordnet_chats.py --data ../shared/data/wordnet/glosses.jsonl

writes ``experiments/data/wordnet_chats.jsonl`` (the same bytes on every run: fixed seeds, sorted keys).
WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

MAX_DEFINITION = 90  # characters: short glosses keep every chat under 64 tokens with SmolLM2's template
SEEDS = {"train": 0, "validation": 1}  # the shuffles examples/finetune_smollm2.py uses


def chats(path: Path, split: str, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` one-word synsets of ``split`` with short definitions, as chat rows, seeded order."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            synset = json.loads(line)
            word = synset["words"][0]
            if synset["split"] != split or "_" in word or " " in word or len(synset["definition"]) > MAX_DEFINITION:
                continue
            rows.append({"messages": [{"role": "user", "content": f"Define the word '{word}'."},
                                      {"role": "assistant", "content": synset["definition"]}],
                         "offset": synset["offset"], "pos": synset["pos"], "split": split})
    random.Random(SEEDS[split]).shuffle(rows)
    return rows[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wordnet/glosses.jsonl"),
                        help="WordNet glosses.jsonl (fields words, definition, split, offset, pos)")
    parser.add_argument("--train-rows", type=int, default=1500, help="training chats (the sweeps use <= 80 x 8)")
    parser.add_argument("--eval-rows", type=int, default=200, help="validation chats (the sweeps score 96)")
    parser.add_argument("--output", type=Path, default=Path("experiments/data/wordnet_chats.jsonl"))
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file; pass --data PATH/TO/glosses.jsonl")
    rows = chats(args.data, "train", args.train_rows) + chats(args.data, "validation", args.eval_rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:  # written aside and renamed: never a half-written file
        f.writelines(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    partial.replace(args.output)
    counts = {split: sum(row["split"] == split for row in rows) for split in SEEDS}
    print(f"wrote {args.output}: {counts['train']} train, {counts['validation']} validation chats")


if __name__ == "__main__":
    main()
