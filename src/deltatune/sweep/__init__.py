"""Experiments as data: a grid of training runs x seeds from a YAML file, one JSONL line per run,
and markdown tables and plots made from the JSONL alone (``deltatune sweep``)."""

from .grid import Cell, SweepSpec, expand, parse_spec, read_spec
from .report import table, write_report
from .results import SCHEMA, append_record, read_records
from .runner import run_sweep

__all__ = ["SCHEMA", "Cell", "SweepSpec", "append_record", "expand", "parse_spec", "read_records", "read_spec",
           "run_sweep", "table", "write_report"]
