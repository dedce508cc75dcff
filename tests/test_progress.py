"""The progress display: tqdm's bar on a terminal or in a notebook, plain lines elsewhere, and the
loss it shows equal to the loss metrics.jsonl records at the same step."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import pytest
from test_train import config, make_run

from deltatune.train import Trainer
from deltatune.train.progress import Progress, in_notebook

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_show_the_logged_loss(tmp_path: Path, tiny_bert_dir: Path, sentiment_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, task, train, test = make_run(tiny_bert_dir, sentiment_file, dropout=0.0)
    Trainer(model, task, train, test, config(tmp_path, max_steps=9, log_every=3, progress=True)).fit()
    err = capsys.readouterr().err  # not a terminal: one plain line per log record, no bar
    shown = {int(m[1]): m[2] for m in re.finditer(r"^step (\d+)/9 loss (\S+) lr", err, re.MULTILINE)}
    logged = {e["step"]: f"{e['loss']:.4f}" for e in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"}
    assert shown == logged and sorted(logged) == [3, 6, 9]
    assert "\r" not in err


def test_a_terminal_gets_a_tqdm_bar_and_messages_above_it() -> None:
    terminal = Terminal()
    progress = Progress(total=4, stream=terminal)
    for step in range(1, 5):
        line = progress.update(step, 0.5 / step, 1e-3, tokens=100)
    progress.message("step 4: accuracy 0.9000")
    progress.close()
    drawn = terminal.getvalue()
    assert line.startswith("step 4/4 loss 0.1250 lr 1.00e-03")
    assert "\r" in drawn and "4/4" in drawn and "loss 0.1250" in drawn  # tqdm redraws in place
    assert "step 4: accuracy 0.9000\n" in drawn


def test_disabled_progress_prints_messages_only() -> None:
    out = Terminal()
    progress = Progress(total=2, enabled=False, stream=out)
    progress.update(1, 0.3, 1e-3, 10)
    progress.message("done")
    progress.close()
    assert out.getvalue() == "done\n"


def test_a_notebook_kernel_gets_a_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert not in_notebook()
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    monkeypatch.setitem(sys.modules, "tqdm.notebook", None)  # as without ipywidgets: tqdm's widget cannot load
    assert in_notebook()
    progress = Progress(total=3)  # stderr is no terminal here, as in Jupyter
    assert progress.live and progress.bar is not None
    progress.update(3, 0.25, 1e-3, 10)
    progress.close()
    # then tqdm's text bar on stderr, which Jupyter redraws in place
    assert "3/3" in capsys.readouterr().err
