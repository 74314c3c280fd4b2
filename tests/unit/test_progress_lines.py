"""Progress off a terminal is whole log lines, never a bar's carriage returns (bench/soak.py, the worker)."""

import io
import os
import subprocess
import sys

from nanodist.workers.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_piped(code: str) -> subprocess.CompletedProcess:
    """Run `code` with stdout and stderr on pipes, as under CI, docker logs or `nanodist up`."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_soak_progress_on_a_pipe_is_one_line_per_report():
    result = run_piped(
        "import sys; sys.path.insert(0, 'bench'); import soak\n"
        "progress = soak.clients_progress(8)\n"
        "for second in range(8):\n"
        "    progress.update(1, f'after {second} s')\n"
        "progress.close()\n"
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\r" not in output
    lines = result.stderr.splitlines()
    assert lines == [f"soak: client processes finished {n}/8 after {n - 1} s" for n in (2, 4, 6, 8)]
    assert result.stderr.endswith("\n")


def test_worker_progress_on_a_pipe_is_about_four_lines_per_epoch():
    result = run_piped(
        "from nanodist.workers.progress import Progress\n"
        "progress = Progress('[rank 0] epoch 1/3', 23)\n"
        "for step in range(23):\n"
        "    progress.update(status=f'loss {1 / (step + 1):.4f}')\n"
        "progress.close()\n"
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr and result.stderr == ""
    lines = result.stdout.splitlines()
    assert [line.split(" loss")[0] for line in lines] == [f"[rank 0] epoch 1/3 step {n}/23" for n in (6, 12, 18, 23)]


def test_a_silent_loop_still_reports_every_so_often():
    out = io.StringIO()
    progress = Progress("soak:", 8, unit="done", every=0.0, stream=out, terminal=False)
    for _ in range(3):
        progress.update(0, "waiting")
    assert out.getvalue() == "soak: done 0/8 waiting\n" * 3


def test_on_a_terminal_it_is_a_bar():
    progress = Progress("x", 4, terminal=True)
    assert progress.bar is not None
    progress.close()
