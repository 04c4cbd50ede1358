"""The CLI's error contract, checked one way everywhere: exit code 2, one line on stderr,
``schedulezero: error: ...``, never a traceback."""

from __future__ import annotations

import subprocess


def one_line_error(code: int | None, stderr: str) -> str:
    """The one error line of a refused command (asserting the contract above)."""
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("schedulezero: error: "), stderr
    return lines[0]


def process_error(result: subprocess.CompletedProcess[str]) -> str:
    """:func:`one_line_error` of a finished ``schedulezero`` process."""
    return one_line_error(result.returncode, result.stderr)
