"""deltatune sweep: grid expansion, the results file, resume, tables and plots, and a real sweep."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

import deltatune.sweep.runner as runner
from deltatune.cli import main
from deltatune.errors import ConfigError, DataError
from deltatune.sweep import SCHEMA, append_record, expand, parse_spec, read_records, run_sweep, table, write_report
from deltatune.sweep.report import mean_std

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def spec_data(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"output_dir": str(tmp / "sweep"), "seeds": [0, 1], "base": {"max_steps": 2, "lr": 1e-3},
            "grid": {"method": ["lora"], "r": [1, 4]}, "cells": [{"method": "full", "lr": "5e-5"}], **extra}


def test_grid_expands_to_cells_times_seeds_in_a_fixed_order(tmp_path: Path) -> None:
    cells = expand(parse_spec(spec_data(tmp_path, grid={"r": [1, 4], "lora_alpha": [8, 16]})))
    assert [(c.name, c.seed) for c in cells] == [
        ("r=1,lora_alpha=8", 0), ("r=1,lora_alpha=8", 1), ("r=1,lora_alpha=16", 0), ("r=1,lora_alpha=16", 1),
        ("r=4,lora_alpha=8", 0), ("r=4,lora_alpha=8", 1), ("r=4,lora_alpha=16", 0), ("r=4,lora_alpha=16", 1),
        ("method=full,lr=5e-05", 0), ("method=full,lr=5e-05", 1)]
    full = cells[-1]
    assert full.options == {"max_steps": 2, "lr": 5e-5, "method": "full"}  # the YAML 1.1 string read as a float
    assert full.run_dir == tmp_path / "sweep" / "method=full__lr=5e-05" / "seed-1"
    assert full.run_options()["seed"] == 1 and full.run_options()["output_dir"] == str(full.run_dir)
    assert len({c.run_dir for c in cells}) == len(cells)


@pytest.mark.parametrize("change, key", [
    ({"base": {"seed": 3}}, "base.seed"), ({"seeds": []}, "seeds"), ({"grid": {"r": 8}}, "grid.r"),
    ({"cells": [{"r": 1}, {"r": 1}]}, "cells"), ({"steps": 3}, "steps")])
def test_bad_sweep_files_name_the_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        expand(parse_spec({**spec_data(tmp_path, grid={}), **change}))


def test_a_misspelt_option_stops_the_sweep_before_any_run(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path, base={"max_step": 2}))
    with pytest.raises(ConfigError, match="max_step"):
        run_sweep(spec, in_process=True, say=lambda _: None)
    assert not spec.results.exists()


def test_results_lines_are_whole_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_record(path, {"cell": "a", "seed": 0, "status": "ok"})
    with path.open("a") as handle:
        handle.write('{"cell": "b", "se')  # a write cut short by a crash
    with pytest.warns(UserWarning, match="torn"):
        assert [r["cell"] for r in read_records(path)] == ["a"]
    append_record(path, {"cell": "c", "seed": 0, "status": "ok"})  # starts on a line of its own
    with pytest.raises(DataError, match=":2:"):
        read_records(path)


class FakeTraining:
    """Stands in for a run: accuracy from the seed; cells named in ``fail`` raise."""

    def __init__(self, fail: set[str]) -> None:
        self.fail, self.calls = fail, []

    def __call__(self, options: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((options.get("r"), options["method"], options["seed"]))
        if options["method"] in self.fail:
            raise RuntimeError("out of memory")
        return {"metrics": {"accuracy": 0.5 + options["seed"] / 10}, "train_loss": 0.1, "steps": 2, "tokens": 100,
                "train_seconds": 2.0, "trainable_parameters": 5, "base_parameters": 100}


def test_resume_skips_finished_runs_and_retries_failed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(spec_data(tmp_path))
    fake = FakeTraining(fail={"full"})
    monkeypatch.setattr(runner, "train_cell", fake)
    written = run_sweep(spec, in_process=True, say=lambda _: None)
    assert [r["status"] for r in written] == ["ok"] * 4 + ["failed"] * 2
    assert written[-1]["error"] == "RuntimeError: out of memory"
    assert len(fake.calls) == 6
    fake.fail.clear()
    again = run_sweep(spec, in_process=True, say=lambda _: None)
    assert fake.calls[6:] == [(None, "full", 0), (None, "full", 1)]
    assert [r["status"] for r in again] == ["ok", "ok"]
    assert run_sweep(spec, in_process=True, say=lambda _: None) == []  # everything finished
    changed = parse_spec(spec_data(tmp_path, base={"max_steps": 3, "lr": 1e-3}))
    assert len(run_sweep(changed, in_process=True, say=lambda _: None)) == 6  # new options: run again


def test_rerun_runs_named_cells_again_and_their_new_lines_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(spec_data(tmp_path))
    fake = FakeTraining(fail=set())
    monkeypatch.setattr(runner, "train_cell", fake)
    run_sweep(spec, in_process=True, say=lambda _: None)
    before = spec.results.read_bytes()
    with pytest.raises(ConfigError, match=r"--rerun.*method=lora,r=4"):  # a typo names the cells there are
        run_sweep(spec, in_process=True, say=lambda _: None, rerun=["method=lora,r=5"])
    assert spec.results.read_bytes() == before and len(fake.calls) == 6
    monkeypatch.setattr(runner, "train_cell", lambda options: {**fake(options), "base_parameters": 50})
    again = run_sweep(spec, in_process=True, say=lambda _: None, rerun=["method=lora,r=4"])
    assert fake.calls[6:] == [(4, "lora", 0), (4, "lora", 1)]
    records = read_records(spec.results)
    assert len(records) == 8 and records[-2:] == again  # the old lines stay as history
    rows = {(r["cell"], r["seed"]): r for r in records}  # the last line of a run is the one read
    assert [rows[("method=lora,r=4", seed)]["trainable_percent"] for seed in (0, 1)] == [10.0, 10.0]
    assert rows[("method=lora,r=1", 0)]["trainable_percent"] == 5.0


@pytest.mark.parametrize("flag", [["--rerun", "r=1"], ["--jobs", "2"]])
def test_report_refuses_what_only_a_run_takes(tmp_path: Path, flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "report", str(tmp_path / "results.jsonl"), *flag]) != 0
    assert flag[0] in capsys.readouterr().err


def test_record_schema_and_derived_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "train_cell", FakeTraining(fail=set()))
    spec = parse_spec(spec_data(tmp_path, seeds=[0], grid={}))
    run_sweep(spec, in_process=True, say=lambda _: None)
    (record,) = read_records(spec.results)
    assert set(record) == set(SCHEMA)
    assert record["trainable_percent"] == 5.0 and record["tokens_per_second"] == 50.0
    assert record["rss_scope"] == "sweep" and record["peak_rss_mib"] > 0
    assert record["settings"] == {"method": "full", "lr": 5e-5}


def fake_records() -> list[dict[str, Any]]:
    accuracies = {"r=1": [0.5, 0.7, 0.9], "r=8": [0.8, 0.8, 0.83], "method=full": [0.9]}
    out = []
    for cell, values in accuracies.items():
        key, _, value = cell.partition("=")
        for seed, accuracy in enumerate(values):
            out.append({"cell": cell, "seed": seed, "status": "ok", "settings": {key: int(value) if key == "r" else value},
                        "metrics": {"accuracy": accuracy}, "peak_rss_mib": 1000.0 + seed})
    out.append({"cell": "r=8", "seed": 3, "status": "failed", "settings": {"r": 8}, "metrics": {}, "error": "boom"})
    return out


def test_table_shows_mean_and_sample_std_per_cell() -> None:
    text = table(fake_records(), ["accuracy", "peak_rss_mib"])
    lines = text.splitlines()
    assert lines[0] == "| r | method | runs | accuracy | peak_rss_mib |"
    # by hand: r=1: mean 0.7, sample std sqrt(((-.2)^2 + 0 + .2^2) / 2) = 0.2
    assert lines[2] == "| 1 | — | 3 | 0.7 ± 0.2 | 1,001 ± 1 |"
    std = statistics.stdev([0.8, 0.8, 0.83])
    assert lines[3] == f"| 8 | — | 3 (1 failed) | {0.81:.4g} ± {std:.4g} | 1,001 ± 1 |"
    assert lines[4] == "| — | full | 1 | 0.9 | 1,000 |"
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(2 ** 0.5))


def test_a_metric_that_echoes_an_option_is_no_default_column() -> None:
    records = [{**r, "options": dict(r["settings"]), "metrics": {**r["metrics"], "r": r["settings"].get("r", 0)}}
               for r in fake_records()]
    assert table(records).splitlines()[0] == ("| r | method | runs | accuracy | train_loss | trainable_percent | "
                                              "peak_rss_mib | train_seconds | tokens_per_second |")
    assert table(records, ["accuracy", "r"]).splitlines()[2] == "| 1 | — | 3 | 0.7 ± 0.2 | 1 ± 0 |"  # chosen: shown


def test_report_writes_tables_and_plots(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    for record in fake_records():
        append_record(path, record)
    report, plots = write_report(path)
    assert report == tmp_path / "results.md" and plots == [tmp_path / "results_plots" / "accuracy_vs_r.png"]
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "| 1 | — | 3 | 0.7 ± 0.2 |" in text and "r=8 seed 3: boom" in text and "(results_plots/accuracy_vs_r.png)" in text
    out = tmp_path / "docs" / "table.md"
    assert main(["sweep", "report", str(path), "--columns", "accuracy", "--output", str(out), "--no-plots"]) == 0
    text = out.read_text()
    assert f"`deltatune sweep report {path.as_posix()} --output {out.as_posix()} --columns accuracy --no-plots`" in text
    assert "| r | method | runs | accuracy |" in text


def test_a_long_legend_goes_beside_the_plot_and_a_short_one_stays_inside(tmp_path: Path) -> None:
    """Sixteen methods' legend inside the axes covered the points; beside them the image widens instead."""
    from matplotlib.image import imread
    from deltatune.sweep.report import plot

    def image_width(cells: int) -> int:
        records = [{"cell": f"method=m{i},r={r}", "seed": 0, "status": "ok", "settings": {"method": f"m{i}", "r": r},
                    "metrics": {"loss": 1.0 + i + r / 10}} for i in range(cells) for r in (1, 4)]
        path = plot(records, "r", "loss", tmp_path / f"{cells}.png")
        return int(imread(path).shape[1])

    figure_width = 6 * 120  # figsize 6 in at 120 dpi
    assert image_width(3) < figure_width  # the legend inside: "tight" only trims the margins
    assert image_width(12) > figure_width  # the legend to the right of the axes, beyond the figure's edge


def test_report_over_two_results_files_keeps_the_named_cells_in_order(tmp_path: Path) -> None:
    """A memory table that reuses another sweep's runs: two files, the chosen cells, one table."""
    first, second = tmp_path / "rank.jsonl", tmp_path / "memory.jsonl"
    for record in fake_records():
        append_record(first, record)
    append_record(second, {"cell": "quantize=nf4", "seed": 0, "status": "ok", "settings": {"quantize": "nf4"},
                           "metrics": {"accuracy": 0.6}, "peak_rss_mib": 500.0})
    out = tmp_path / "table.md"
    argv = ["sweep", "report", str(second), str(first), "--cells", "quantize=nf4", "method=full", "--output", str(out),
            "--columns", "accuracy", "--no-plots"]
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    header = lines.index("| quantize | method | runs | accuracy |")
    assert lines[header + 2:header + 4] == ["| nf4 | — | 1 | 0.6 |", "| — | full | 1 | 0.9 |"]
    assert f"deltatune sweep report {second.as_posix()} {first.as_posix()} --output" in lines[2]


def test_report_refuses_what_it_cannot_make_one_table_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append_record(first, {"cell": "r=8", "seed": 0, "status": "ok", "settings": {"r": 8}, "options": {"lr": 1e-3}})
    append_record(second, {"cell": "r=8", "seed": 1, "status": "ok", "settings": {"r": 8}, "options": {"lr": 1e-2}})
    out = tmp_path / "t.md"
    refused = {"different options": [str(first), str(second), "--output", str(out)],
               "--output": [str(first), str(second)],
               "names no cell of the results.*use cell names as the table prints them: r=8":
                   [str(first), "--cells", "r=4", "--output", str(out)]}
    for reason, paths in refused.items():
        assert main(["sweep", "report", *paths, "--no-plots"]) != 0
        assert re.search(reason, capsys.readouterr().err), reason
    assert not out.exists()


def tiny_base(model: Path, data: Path) -> dict[str, Any]:
    return {"model": str(model), "train_file": str(data), "max_steps": 2, "batch_size": 8, "max_eval_rows": 16,
            "threads": 1, "progress": False, "lr": 1e-3}


def test_a_real_sweep_of_two_cells_and_two_seeds(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path) -> None:
    """Real training runs through the command line, resumed, then the report from the JSONL."""
    sweep = {"output_dir": str(tmp_path / "sweep"), "seeds": [0, 1], "base": tiny_base(tiny_bert_dir, sentiment_file),
             "cells": [{"method": "lora", "r": 2}, {"method": "full"}]}
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(sweep))  # JSON is YAML
    assert main(["sweep", str(config), "--in-process", "--report", "--no-plots"]) == 0
    records = read_records(tmp_path / "sweep" / "results.jsonl")
    assert [(r["cell"], r["seed"], r["status"]) for r in records] == [
        ("method=lora,r=2", 0, "ok"), ("method=lora,r=2", 1, "ok"), ("method=full", 0, "ok"), ("method=full", 1, "ok")]
    for record in records:
        assert record["steps"] == 2 and 0 <= record["metrics"]["accuracy"] <= 1 and record["tokens_per_second"] > 0
        assert (Path(record["run_dir"]) / "adapter" / "adapter_config.json").is_file()
    assert [r["trainable_percent"] for r in records][2:] == [100.0, 100.0]  # full: every parameter once
    assert records[0]["trainable_percent"] < 10
    assert main(["sweep", str(config), "--in-process"]) == 0  # resumed: nothing left to run
    assert len(read_records(tmp_path / "sweep" / "results.jsonl")) == 4
    report = (tmp_path / "sweep" / "results.md").read_text()
    assert "| lora | 2 | 2 |" in report and "| full | — | 2 |" in report


def test_a_run_in_its_own_process_reports_its_memory(tmp_path: Path, tiny_bert_dir: Path,
                                                     sentiment_file: Path) -> None:
    spec = parse_spec({"output_dir": str(tmp_path / "sweep"), "base": tiny_base(tiny_bert_dir, sentiment_file),
                       "cells": [{"method": "full"}]})
    (record,) = run_sweep(spec, say=lambda _: None)
    assert record["status"] == "ok" and record["rss_scope"] == "run" and record["peak_rss_mib"] > 50
    assert record["trainable_percent"] == 100.0 and record["wall_seconds"] > record["train_seconds"] > 0
    assert "after training" in (Path(record["run_dir"]) / "train.log").read_text()


def test_a_killed_run_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A process the system kills (out of memory) writes no result; the sweep records how it ended."""
    kill = "import os, signal, sys; print('dying'); sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(runner, "CHILD_COMMAND", (sys.executable, "-c", kill))
    spec = parse_spec(spec_data(tmp_path, seeds=[0], grid={}, cells=[{"r": 1}, {"r": 2}]))
    records = run_sweep(spec, say=lambda _: None)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert "killed by signal 9" in records[0]["error"] and records[0]["peak_rss_mib"] > 0
    assert (Path(records[0]["run_dir"]) / "train.log").read_text() == "dying\n"


# A stand-in for a run's process: it marks its start, waits until every run of the sweep has started
# (so the sweep passes only if they run side by side; alone, it fails after a minute), then reports.
TOGETHER = """
import json, sys, time
from pathlib import Path
options, result = (json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
marks = Path(sys.argv[1]).parents[2] / "started"
marks.mkdir(exist_ok=True)
(marks / str(options["r"])).touch()
deadline = time.monotonic() + 60
while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
alone = len(list(marks.iterdir())) < 2
result.write_text(json.dumps({"error": "ran alone"} if alone else {"metrics": {"accuracy": options["r"] / 10}}))
"""


def test_jobs_run_side_by_side_and_each_line_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "CHILD_COMMAND", (sys.executable, "-c", TOGETHER))
    spec = parse_spec(spec_data(tmp_path, seeds=[0], grid={}, cells=[{"r": 1}, {"r": 2}]))
    records = run_sweep(spec, say=lambda _: None, jobs=2)
    assert sorted((r["cell"], r["status"], r["metrics"].get("accuracy")) for r in records) == [
        ("r=1", "ok", 0.1), ("r=2", "ok", 0.2)]
    def lines(found: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in found)

    assert lines(read_records(spec.results)) == lines(records)
    assert all(r["rss_scope"] == "run" and r["peak_rss_mib"] > 0 for r in records)


@pytest.mark.parametrize("jobs, in_process, why", [(0, False, "pass 1 or more"), (2, True, "drop --in-process")])
def test_bad_jobs_are_refused_before_any_run(tmp_path: Path, jobs: int, in_process: bool, why: str) -> None:
    spec = parse_spec(spec_data(tmp_path))
    with pytest.raises(ConfigError, match=why):
        run_sweep(spec, in_process=in_process, say=lambda _: None, jobs=jobs)
    assert not spec.results.exists() and not spec.output_dir.exists()


class _Writes:
    """A stdout that records each write call apart."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_lines_are_written_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # --jobs prints from several threads: a line written in two calls (text, then newline) can be cut in
    # two by another thread's line, so each line must leave in one write.
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    runner.say_now("[4/42] cell seed 0 -> runs/x")
    runner.say_now("[2/42 done] cell seed 1: loss 2.8")
    assert out.calls == ["[4/42] cell seed 0 -> runs/x\n", "[2/42 done] cell seed 1: loss 2.8\n"]
