"""Rows of training data from local JSONL, CSV or Parquet files, folders that ``datasets`` saved,
or objects in memory (lists of dicts, pandas DataFrames, ``datasets.Dataset`` / ``DatasetDict``).

A row is a plain ``dict`` from column name to value. Reading is strict by default: a line
that is not a JSON object, or not valid UTF-8, stops the run with the file and line number;
``skip_bad_rows`` skips and counts such lines instead. Each row read from a file remembers
where it came from (``file:line``), so a later check of a cell (a null label, a text that is
not text) names the line too. Column checks (which columns a task needs) happen in
:func:`require_columns`, so the error can list the columns that were found.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

Row = dict[str, Any]
FORMATS = ("jsonl", "csv", "parquet")
SKIP_HINT = "pass --skip-bad-rows to skip and count bad rows"


@dataclass
class Rows:
    """The rows read from one source, where each came from, and which bad ones were skipped."""

    rows: list[Row]
    source: str
    skipped: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    """``file:line`` (``file, row N`` for Parquet) of each row; empty for rows from memory."""

    def where(self, index: int) -> str:
        """Where row ``index`` (0-based) came from: ``file:line``, else ``source, row N``."""
        return self.origins[index] if self.origins else f"{self.source}, row {index + 1}"

    def subject(self, index: int) -> str:
        """Row ``index`` as the subject of a sentence: ``file:line``, else ``source: row N``."""
        return self.origins[index] if self.origins else f"{self.source}: row {index + 1}"

    def subset(self, indices: Sequence[int], source: str | None = None) -> Rows:
        """The rows at ``indices``, keeping their origins and the skipped list."""
        origins = [self.origins[i] for i in indices] if self.origins else []
        return Rows([self.rows[i] for i in indices], self.source if source is None else source,
                    list(self.skipped), origins)


def file_format(path: Path) -> str:
    """The format a file name says: .jsonl/.json -> jsonl, .csv, .parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    raise DataError(f"{path}: unknown data format {suffix!r}; use a .jsonl, .csv or .parquet file")


class Lines:
    """The lines of a text file, decoded as UTF-8 one at a time.

    Decoding line by line (not the whole file through ``open(encoding=...)``) is what lets a bad
    byte be reported with its line, or skipped with it. ``number`` is the line last read.
    """

    def __init__(self, path: Path, skip_bad_rows: bool, skipped: list[str]) -> None:
        self.path, self.skip_bad_rows, self.skipped = path, skip_bad_rows, skipped
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as f:
            for self.number, raw in enumerate(f, start=1):
                try:
                    # a byte-order mark (as Windows tools write) is not part of the first line's text
                    yield raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    self.bad(f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})",
                             "Save the file as UTF-8")

    def bad(self, why: str, fix: str = "Fix the line") -> None:
        """Stop at the current line, or (``skip_bad_rows``) record it as skipped."""
        where = f"{self.path}:{self.number}"
        if not self.skip_bad_rows:
            raise DataError(f"{where}: {why}. {fix}, or {SKIP_HINT}.")
        self.skipped.append(where)


def _read_jsonl(path: Path, skip_bad_rows: bool) -> Rows:
    result = Rows([], str(path))
    lines = Lines(path, skip_bad_rows, result.skipped)
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as error:
            lines.bad(f"not a JSON object ({error})")
            continue
        result.rows.append(row)
        result.origins.append(f"{path}:{lines.number}")
    return result


def _read_csv(path: Path, skip_bad_rows: bool) -> Rows:
    result = Rows([], str(path))
    lines = Lines(path, skip_bad_rows, result.skipped)
    try:
        for row in csv.DictReader(lines):
            result.rows.append(dict(row))
            result.origins.append(f"{path}:{lines.number}")  # a quoted multi-line row: its last line
    except csv.Error as error:
        raise DataError(f"{path}:{lines.number}: not valid CSV ({error}); fix the line") from None
    return result


def _read_parquet(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    return Rows(rows, str(path), origins=[f"{path}, row {n}" for n in range(1, len(rows) + 1)])


def read_rows(path: str | Path, skip_bad_rows: bool = False, split: str = "") -> Rows:
    """Read every row of a JSONL, CSV or Parquet file, or of a folder ``datasets``' ``save_to_disk``
    wrote (``split``: which split of a saved ``DatasetDict``); an empty file is an error."""
    path = Path(path)
    if path.is_dir() and is_saved_dataset(path):
        return _read_saved(path, split)
    if not path.is_file():
        raise DataError(f"{path}: no such data file" + (" (a folder, but not one that datasets' save_to_disk wrote)"
                                                        if path.is_dir() else ""))
    fmt = file_format(path)
    rows = (_read_jsonl(path, skip_bad_rows) if fmt == "jsonl" else _read_csv(path, skip_bad_rows) if fmt == "csv"
            else _read_parquet(path))
    if not rows.rows:
        raise DataError(f"{path}: the file has no rows" + (f" ({len(rows.skipped)} bad lines skipped)" if rows.skipped else ""))
    return rows


def rows_from(data: Any, source: str = "data") -> Rows:
    """Rows from objects in memory: a list of dicts, a pandas DataFrame or a ``datasets.Dataset``
    (class-label columns become their label names). A ``DatasetDict`` holds several splits: pick one, or
    use :func:`splits_from`. A streamed dataset is never loaded whole here (see ``train/stream.py``)."""
    if is_dataset_dict(data):
        raise DataError(f"{source}: a DatasetDict holding the splits {sorted(data)}; pass one split (e.g. "
                        "data['train']), or use deltatune.train.splits_from(data) for training and evaluation rows")
    if is_stream(data):
        raise DataError(f"{source}: a streamed dataset ({type(data).__name__}) has no length and is not loaded whole; "
                        "pass it to deltatune.train.stream_features(task, data) and set TrainConfig.max_steps")
    if is_data_frame(data):
        rows = [{str(k): v for k, v in row.items()} for row in data.to_dict(orient="records")]
    else:
        rows = [dict(row) for row in data]
        rows = with_label_names(rows, getattr(data, "features", None))
    if not rows:
        raise DataError(f"{source}: no rows")
    return Rows(rows, source)


def is_data_frame(data: Any) -> bool:
    """A pandas DataFrame (told by what it does, so pandas is not imported here)."""
    return callable(getattr(data, "to_dict", None)) and hasattr(data, "columns") and hasattr(data, "iloc")


def is_dataset_dict(data: Any) -> bool:
    """A ``datasets.DatasetDict`` / ``IterableDatasetDict``: a mapping from split name to a dataset."""
    return isinstance(data, Mapping) and bool(data) and all(hasattr(v, "column_names") for v in data.values())


def is_stream(data: Any) -> bool:
    """A streamed dataset (``datasets.IterableDataset``): columns, but no length. A plain generator of rows
    is read whole like a list."""
    return not hasattr(data, "__len__") and hasattr(data, "column_names")


def with_label_names(rows: list[Row], features: Any) -> list[Row]:
    """``rows`` with ``datasets`` class-label columns (stored as ids) holding their names, as in a file."""
    names = {column: feature.names for column, feature in (features or {}).items()
             if isinstance(getattr(feature, "names", None), list)}
    for row in rows if names else ():
        for column, labels in names.items():
            value = row.get(column)
            if isinstance(value, int) and 0 <= value < len(labels):
                row[column] = labels[value]
    return rows


DATASET_FILES = ("dataset_dict.json", "state.json")
"""What ``save_to_disk`` writes at the top of a folder: a DatasetDict's split list, a Dataset's state."""


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in DATASET_FILES)


def open_saved(path: Path) -> Any:
    """The ``Dataset`` or ``DatasetDict`` in a ``save_to_disk`` folder (memory-mapped, not read whole)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a folder saved by the datasets library; reading it needs it: pip install datasets") \
            from None
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable datasets folder ({error})") from None


def saved_splits(path: str | Path) -> list[str]:
    """The splits of a DatasetDict that ``save_to_disk`` wrote to ``path``; [] for anything else."""
    path = Path(path)
    if not (path / DATASET_FILES[0]).is_file():
        return []
    try:
        splits = json.loads((path / DATASET_FILES[0]).read_text(encoding="utf-8")).get("splits", [])
    except (ValueError, AttributeError):
        raise DataError(f"{path / DATASET_FILES[0]}: not the JSON object datasets writes; save the data again") from None
    return [str(name) for name in splits]


def _read_saved(path: Path, split: str) -> Rows:
    data = open_saved(path)
    if is_dataset_dict(data):
        if not split and len(data) == 1:  # nothing to choose between
            split = next(iter(data))
        if split not in data:
            wanted = f"has no split {split!r}" if split else "holds several splits"
            raise DataError(f"{path}: this DatasetDict {wanted}; its splits: {sorted(data)}. Name one "
                            "(train: --train-split / --eval-split; eval and predict: --split)")
        return rows_from(data[split], f"{path} [split {split}]")
    return rows_from(data, str(path))


def rows_of_split(path: str | Path, split: str, split_column: str, skip_bad_rows: bool = False) -> Rows:
    """The rows of one chosen split: that split of a saved ``DatasetDict`` (an error naming its splits when
    it has none of that name; no fallback, the user named it), else the rows whose ``split_column`` is ``split``."""
    if saved_splits(path):
        return read_rows(path, skip_bad_rows, split=split)
    return split_rows(read_rows(path, skip_bad_rows), split_column, split)


def eval_split_of(splits: Sequence[str], wanted: str, source: str) -> str:
    """The split to evaluate on: ``wanted`` when there is one, else "validation", else an error."""
    for name in (wanted, "validation"):
        if name in splits:
            return name
    raise DataError(f"{source}: no split {wanted!r} or 'validation' to evaluate on; its splits: {sorted(splits)}. "
                    "Pass --eval-split NAME or --eval-file")


def splits_from(data: Any, train_split: str = "train", eval_split: str = "test") -> tuple[Rows, Rows]:
    """Training and evaluation rows of a ``DatasetDict``: ``train_split``, and ``eval_split`` (else "validation")."""
    if not is_dataset_dict(data):
        raise DataError(f"splits_from needs a DatasetDict (splits by name), not a {type(data).__name__}; "
                        "pass the training and evaluation data separately")
    if train_split not in data:
        raise DataError(f"the DatasetDict has no split {train_split!r}; its splits: {sorted(data)}")
    chosen = eval_split_of(list(data), eval_split, "the DatasetDict")
    return rows_from(data[train_split], f"split {train_split}"), rows_from(data[chosen], f"split {chosen}")


def split_rows(rows: Rows, column: str, value: str) -> Rows:
    """The rows whose ``column`` equals ``value`` (one file holding train/validation/test)."""
    require_columns(rows, [column])
    chosen = [i for i, r in enumerate(rows.rows) if str(r[column]) == value]
    if not chosen:
        found = sorted({str(r[column]) for r in rows.rows})
        raise DataError(f"{rows.source}: no row has {column}={value!r}; values found: {found}")
    return rows.subset(chosen, f"{rows.source} [{column}={value}]")


def require_columns(rows: Rows, columns: Sequence[str]) -> None:
    """Fail, naming the columns found, if a row lacks one of ``columns``."""
    for index, row in enumerate(rows.rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(
                f"{rows.subject(index)} has no column {missing[0]!r}; columns found: {sorted(row)}. "
                "Rename the column in the data, or map it with --columns ROLE=COLUMN."
            )


def is_null(value: Any) -> bool:
    """JSON null, or NaN (how Parquet/pandas write a missing number)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def drop_null_rows(rows: Rows, columns: Sequence[str], skip_bad_rows: bool) -> Rows:
    """``rows`` without those whose cell in one of ``columns`` is null.

    A null cell is an error naming the row's file and line: kept, it would train on the text
    "None" (or a class named "None"). With ``skip_bad_rows`` such rows are skipped and counted.
    """
    kept, skipped = [], list(rows.skipped)
    for index, row in enumerate(rows.rows):
        null = next((c for c in columns if is_null(row.get(c))), None)
        if null is None:
            kept.append(index)
        elif skip_bad_rows:
            skipped.append(rows.where(index))
        else:
            raise DataError(f"{rows.where(index)}: column {null!r} is null (no value). Fix the row, or {SKIP_HINT}.")
    if len(kept) == len(rows.rows):
        return rows
    if not kept:
        raise DataError(f"{rows.source}: every row has a null in one of the columns {list(columns)}")
    result = rows.subset(kept)
    result.skipped = skipped
    return result
