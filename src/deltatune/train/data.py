"""Rows of training data from local JSONL, CSV or Parquet files, or from objects in memory.

A row is a plain ``dict`` from column name to value. Reading is strict by default: a line
that is not a JSON object stops the run with the file and line number; ``skip_bad_rows``
skips and counts such lines instead. Column checks (which columns a task needs) happen in
:func:`require_columns`, so the error can list the columns that were found.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

Row = dict[str, Any]
FORMATS = ("jsonl", "csv", "parquet")


@dataclass
class Rows:
    """The rows read from one source, and how many bad ones were skipped (with where)."""

    rows: list[Row]
    source: str
    skipped: list[str] = field(default_factory=list)


def file_format(path: Path) -> str:
    """The format a file name says: .jsonl/.json -> jsonl, .csv, .parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    raise DataError(f"{path}: unknown data format {suffix!r}; use a .jsonl, .csv or .parquet file")


def _read_jsonl(path: Path, skip_bad_rows: bool) -> Rows:
    result = Rows([], str(path))
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as error:
                where = f"{path}:{number}"
                if not skip_bad_rows:
                    raise DataError(f"{where}: not a JSON object ({error}). Fix the line, or pass "
                                    "--skip-bad-rows to skip and count bad lines.") from None
                result.skipped.append(where)
                continue
            result.rows.append(row)
    return result


def _read_csv(path: Path) -> Rows:
    with path.open(encoding="utf-8", newline="") as f:
        return Rows([dict(row) for row in csv.DictReader(f)], str(path))


def _read_parquet(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    return Rows(pq.read_table(path).to_pylist(), str(path))


def read_rows(path: str | Path, skip_bad_rows: bool = False) -> Rows:
    """Read every row of a JSONL, CSV or Parquet file; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    fmt = file_format(path)
    rows = _read_jsonl(path, skip_bad_rows) if fmt == "jsonl" else _read_csv(path) if fmt == "csv" else _read_parquet(path)
    if not rows.rows:
        raise DataError(f"{path}: the file has no rows" + (f" ({len(rows.skipped)} bad lines skipped)" if rows.skipped else ""))
    return rows


def rows_from(data: Iterable[Mapping[str, Any]], source: str = "data") -> Rows:
    """Rows from objects in memory: a list of dicts or a ``datasets.Dataset``."""
    rows = [dict(row) for row in data]
    if not rows:
        raise DataError(f"{source}: no rows")
    return Rows(rows, source)


def split_rows(rows: Rows, column: str, value: str) -> Rows:
    """The rows whose ``column`` equals ``value`` (one file holding train/validation/test)."""
    require_columns(rows, [column])
    chosen = [r for r in rows.rows if str(r[column]) == value]
    if not chosen:
        found = sorted({str(r[column]) for r in rows.rows})
        raise DataError(f"{rows.source}: no row has {column}={value!r}; values found: {found}")
    return Rows(chosen, f"{rows.source} [{column}={value}]", rows.skipped)


def require_columns(rows: Rows, columns: Sequence[str]) -> None:
    """Fail, naming the columns found, if a row lacks one of ``columns``."""
    for number, row in enumerate(rows.rows, start=1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(
                f"{rows.source}: row {number} has no column {missing[0]!r}; columns found: {sorted(row)}. "
                "Rename the column in the data, or map it with --columns ROLE=COLUMN."
            )
