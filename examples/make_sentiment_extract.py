"""Build the small sentiment extract that ships inside deltatune.

Reads the full VADER human-rated sentence set (``sentences.jsonl``, see
``../shared/data/README.md``) and writes:

* ``src/deltatune/data/sentiment.jsonl`` -- binary rows only (``label2`` not null), with the
  fields ``text``, ``label`` ("positive"/"negative"), ``domain`` and ``split``; a stratified
  random sample (by domain x label inside each split, fixed seed) of about 4000 train,
  500 validation and 1000 test rows. The original split of every row is kept, so the
  extract's test rows are a subset of the full set's test rows.
* ``src/deltatune/data/SENTIMENT_LICENSE.md`` -- the attribution and a note of how the
  extract was made (seed, sizes, source checksum).

The output is byte-for-byte reproducible for a given source file and seed.

Usage (from the project root)::

    python examples/make_sentiment_extract.py
    python examples/make_sentiment_extract.py --source ../shared/data/sentiment/sentences.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = PROJECT_ROOT.parent / "shared" / "data" / "sentiment" / "sentences.jsonl"
DEFAULT_OUT_DIR = PROJECT_ROOT / "src" / "deltatune" / "data"

SEED = 20140601  # fixed; ICWSM 2014 opened in June 2014
SPLIT_SIZES: dict[str, int] = {"train": 4000, "validation": 500, "test": 1000}
SPLIT_ORDER = ("train", "validation", "test")
FIELDS = ("text", "label", "domain", "split")

Stratum = tuple[str, str]  # (domain, label)


def read_binary_rows(source: Path) -> list[dict[str, str]]:
    """Return the rows of ``source`` that have a binary label, reduced to ``FIELDS``."""
    rows: list[dict[str, str]] = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["label2"] is None:
                continue
            rows.append(
                {
                    "text": record["text"],
                    "label": record["label2"],
                    "domain": record["domain"],
                    "split": record["split"],
                }
            )
    return rows


def allocate(counts: dict[Stratum, int], total: int) -> dict[Stratum, int]:
    """Split ``total`` over strata in proportion to ``counts`` (largest remainder method).

    Ties in the remainders are broken by stratum name so the result is deterministic.
    """
    available = sum(counts.values())
    if total >= available:
        return dict(counts)
    quotas = {key: n * total / available for key, n in counts.items()}
    result = {key: int(q) for key, q in quotas.items()}
    leftover = total - sum(result.values())
    by_remainder = sorted(quotas, key=lambda key: (-(quotas[key] - result[key]), key))
    for key in by_remainder[:leftover]:
        result[key] += 1
    return result


def stratified_sample(rows: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Sample each split down to ``SPLIT_SIZES``, stratified by (domain, label).

    Rows keep their original order inside each split; splits come train, validation, test.
    """
    rng = random.Random(seed)
    chosen: list[dict[str, str]] = []
    for split in SPLIT_ORDER:
        indexed = [(i, row) for i, row in enumerate(rows) if row["split"] == split]
        strata: dict[Stratum, list[int]] = defaultdict(list)
        for i, row in indexed:
            strata[(row["domain"], row["label"])].append(i)
        quota = allocate({key: len(ids) for key, ids in strata.items()}, SPLIT_SIZES[split])
        keep: set[int] = set()
        for key in sorted(strata):
            keep.update(rng.sample(strata[key], quota[key]))
        chosen.extend(row for i, row in indexed if i in keep)
    return chosen


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """Write ``rows`` as compact UTF-8 JSON lines with a fixed field order."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_table(rows: list[dict[str, str]]) -> str:
    """Return a Markdown table of row counts by split, domain and label."""
    counts = Counter((r["split"], r["domain"], r["label"]) for r in rows)
    domains = sorted({r["domain"] for r in rows})
    lines = ["| split | domain | negative | positive |", "|---|---|---:|---:|"]
    for split in SPLIT_ORDER:
        for domain in domains:
            neg, pos = counts[(split, domain, "negative")], counts[(split, domain, "positive")]
            lines.append(f"| {split} | {domain} | {neg} | {pos} |")
        neg = sum(v for (s, _, lab), v in counts.items() if s == split and lab == "negative")
        pos = sum(v for (s, _, lab), v in counts.items() if s == split and lab == "positive")
        lines.append(f"| **{split}** | all | **{neg}** | **{pos}** |")
    return "\n".join(lines)


def license_text(rows: list[dict[str, str]], source_sha256: str, out_sha256: str, seed: int) -> str:
    """Return the contents of SENTIMENT_LICENSE.md: attribution plus provenance."""
    return f"""\
# sentiment.jsonl — attribution, license and provenance

`sentiment.jsonl` is a small extract ({len(rows)} sentences) of the sentence-level sentiment
data of

> C.J. Hutto and Eric Gilbert. "VADER: A Parsimonious Rule-based Model for Sentiment
> Analysis of Social Media Text." Eighth International AAAI Conference on Weblogs and
> Social Media (ICWSM-14), Ann Arbor, MI, June 2014.

as redistributed by the VADER authors in the source distribution of the PyPI package
`vaderSentiment==3.3.2` (file `additional_resources/hutto_ICWSM_2014.tar.gz`), which is
released under the MIT license:

```
The MIT License (MIT)

Copyright (c) 2016 C.J. Hutto

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
```

## Underlying corpora

The sentences themselves come from research corpora that the VADER authors collected,
had rated by about 20 people each on a -4..+4 scale, and redistribute in that package:

- `movieReviewSnippets`: sentence-level snippets of the 2,000 movie reviews (1,000 positive,
  1,000 negative) of Bo Pang and Lillian Lee, "A Sentimental Education: Sentiment Analysis
  Using Subjectivity Summarization Based on Minimum Cuts" (ACL 2004).
- `amazonReviewSnippets`: sentence-level snippets of 309 Amazon customer reviews of 5
  products, from Minqing Hu and Bing Liu, "Mining and Summarizing Customer Reviews"
  (KDD 2004).
- `tweets`: tweet-like texts (usernames and URLs anonymised) inspired by 4,000 tweets from
  Twitter's public timeline, plus 200 contrived ones, collected by Hutto & Gilbert.
- `nytEditorialSnippets`: sentence-level snippets of 500 New York Times opinion editorials,
  collected by Hutto & Gilbert.

Please cite Hutto & Gilbert (2014) when you use this data (and the corpus papers above
where relevant). Anyone redistributing this extract must keep this file with it.

## How the extract was made

Made by `examples/make_sentiment_extract.py` (run it from the project root to rebuild it;
the output is byte-for-byte reproducible) from `sentences.jsonl`, a JSON-lines conversion
of `hutto_ICWSM_2014.tar.gz` with fields `id, domain, text, mean, sd, label3, label2, split`
(`label2`: negative if the raters' mean <= -0.5, positive if >= 0.5, null in between;
`split`: train / validation / test, fixed by a hash of domain and id).

1. Keep only rows with a binary label (`label2` not null); drop the neutral band.
2. Keep the fields `text`, `label` (= `label2`), `domain`, `split`; each row keeps its
   original split.
3. Inside each split, sample without replacement, stratified by (domain, label) with
   proportional (largest-remainder) allocation, `random.Random({seed})`, to
   {SPLIT_SIZES["train"]} train / {SPLIT_SIZES["validation"]} validation / {SPLIT_SIZES["test"]} test rows.
4. Write rows in source order, grouped train, validation, test, as compact UTF-8 JSON lines.

- source `sentences.jsonl` SHA-256: `{source_sha256}`
- output `sentiment.jsonl` SHA-256: `{out_sha256}`

Counts in the extract:

{count_table(rows)}
"""


def parse_args() -> argparse.Namespace:
    """Parse command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="full sentences.jsonl")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the extract")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed")
    return parser.parse_args()


def main() -> None:
    """Build the extract and its license file."""
    args = parse_args()
    rows = stratified_sample(read_binary_rows(args.source), args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data_path = args.out_dir / "sentiment.jsonl"
    write_jsonl(rows, data_path)
    license_path = args.out_dir / "SENTIMENT_LICENSE.md"
    license_path.write_text(
        license_text(rows, sha256_of(args.source), sha256_of(data_path), args.seed),
        encoding="utf-8",
        newline="\n",
    )
    counts = Counter(r["split"] for r in rows)
    size_kib = data_path.stat().st_size / 1024
    print(f"wrote {data_path} ({len(rows)} rows: {dict(counts)}, {size_kib:.0f} KiB)")
    print(f"wrote {license_path}")


if __name__ == "__main__":
    main()
