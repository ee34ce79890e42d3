"""The progress bar: silent off a terminal or with verbose=False, drawn on a terminal."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from interop.progress import enabled, progress

ROOT = Path(__file__).resolve().parents[1]


def test_silent_when_stderr_is_not_a_tty(capsys):
    assert list(progress(range(5), desc="work")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_verbose_false_is_silent_even_when_forced_stream_is_a_tty():
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = FakeTTY()
    assert list(progress([1, 2], verbose=False, stream=stream)) == [1, 2]
    assert stream.getvalue() == ""
    assert enabled(None, stream) and not enabled(False, stream)


def test_forced_bar_counts_to_total_and_ends_the_line():
    stream = io.StringIO()
    items = list(progress(iter(range(10)), total=10, desc="emit", verbose=True, stream=stream))
    assert items == list(range(10))
    text = stream.getvalue()
    assert text.startswith("\remit: [") and text.endswith("\n")
    assert "10/10" in text and "#" * 24 in text


def test_unknown_total_and_early_exit():
    stream = io.StringIO()
    for item in progress((i for i in range(100)), desc="fuzz", verbose=True, stream=stream):
        if item == 2:
            break
    # items 0 and 1 were finished when the loop broke on 2; the line is still ended
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("fuzz: 2 (") and last.endswith("s)\n")


def test_drawn_on_a_pseudo_terminal():
    # a real terminal on stderr, verbose left at its default
    script = (
        "from interop.progress import progress\nfor _ in progress(range(3), desc='pty'): pass\n"
    )
    output = _stderr_on_a_terminal(script)
    assert b"pty: [" in output and b"3/3" in output


def _stderr_on_a_terminal(script: str) -> bytes:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=follower, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, output[-2000:]
    return output


def test_tracing_and_emitting_show_bars_on_a_terminal():
    script = (
        "import torch, interop\n"
        "net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(160)])\n"
        "g = interop.trace(net, (torch.randn(2, 8),))\n"
        "assert len(g.model.graph) >= 300, len(g.model.graph)\n"
        "interop.to_torch(g)\n"
    )
    output = _stderr_on_a_terminal(script)
    assert b"trace Sequential: [" in output and b"3/3" in output
    assert b"emit TorchEmitter: [" in output
