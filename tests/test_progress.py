"""common.progress: tqdm on a terminal, whole lines in a log file (no carriage returns)."""
import io

from tqdm import tqdm

from chained_tuning.common import LogProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(n, monkeypatch, postfix=False, **kw):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    f = io.StringIO()
    bar = progress(range(n), "finetune arc", file=f, min_s=0, **kw)
    for i in bar:
        if postfix:
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    return f.getvalue()


def test_a_log_gets_one_plain_line_per_tenth(monkeypatch):
    out = run(100, monkeypatch, postfix=True)
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 10
    assert lines[0].startswith("finetune arc: 10/100 (10%) elapsed ") and "eta " in lines[0]
    assert lines[-1].startswith("finetune arc: 100/100 (100%)") and lines[-1].endswith("loss=0.0100")


def test_a_short_loop_gives_a_line_per_item_and_a_fast_one_few_lines(monkeypatch):
    assert len(run(3, monkeypatch).splitlines()) == 3
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    f = io.StringIO()
    for _ in progress(range(1000), "evaluate", file=f):  # far below min_s a line: only the last one
        pass
    lines = f.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: 1000/1000 (100%)")


def test_without_a_length_lines_come_with_time():
    f = io.StringIO()
    bar = LogProgress(iter(range(4)), "scan", None, f, every_s=0.0)
    assert list(bar) == [0, 1, 2, 3]
    assert f.getvalue().splitlines()[0].startswith("scan: 1 elapsed ") and len(f.getvalue().splitlines()) == 4


def test_a_terminal_gets_tqdm_and_disable_silences_both(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert isinstance(progress(range(3), "x", file=Terminal()), tqdm)
    f = io.StringIO()
    bar = progress(range(3), "x", file=f, disable=True)
    bar.set_postfix(loss=1)
    assert list(bar) == [0, 1, 2] and f.getvalue() == ""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress(range(3), "x", file=f)) == [0, 1, 2] and f.getvalue() == ""
