"""CI's test step, in two checks that `.ci/run` calls with its fixed commands.

``readme``: the README's test block (its second fenced block) must be exactly the setup and test
commands CI runs, so the command a reader copies is the one CI proves. ``run``: run the test
command and fail unless pytest ran at least one test: its exit status 5 ("no tests collected")
and a summary with nothing passed (everything skipped or deselected) are failures, never green.

Standard library only: it runs before and after the packages are installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import deque
from pathlib import Path

__all__ = ["readme_block", "check_readme", "summary_line", "passed_count", "run_tests", "main"]

NO_TESTS_COLLECTED = 5  # pytest.ExitCode.NO_TESTS_COLLECTED
_SUMMARY = re.compile(r"^=*\s*(?P<body>(?:no tests ran|\d+ \w+).*?) in [\d.]+s\b.*$")


def readme_block(text: str, index: int = 2) -> str | None:
    """The content of the ``index``-th fenced block (1-based), without its fences; None if absent."""
    blocks, inside, lines = 0, False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside and blocks == index:
                return "\n".join(lines)
            inside = not inside
            blocks += inside
            continue
        if inside and blocks == index:
            lines.append(line)
    return None


def check_readme(readme: Path, setup: str, test: str) -> str | None:
    """None when the README's test block is ``setup`` then ``test``; else what differs and the fix."""
    expected = f"{setup}\n{test}"
    found = readme_block(readme.read_text())
    if found == expected:
        return None
    return (
        f"{readme}'s test block (its second fenced block) is not the command .ci/run runs.\n"
        f"  README:     {found!r}\n"
        f"  .ci/run:    {expected!r}\n"
        "Make them the same: edit the README block, or setup_cmd/test_cmd in .ci/run."
    )


def summary_line(lines: list[str]) -> str | None:
    """pytest's closing line (``3 passed, 1 skipped in 0.12s``, ``no tests ran in 0.01s``)."""
    for line in reversed(lines):
        m = _SUMMARY.match(line.strip())
        if m:
            return m.group("body")
    return None


def passed_count(summary: str) -> int:
    m = re.search(r"(\d+) passed", summary)
    return int(m.group(1)) if m else 0


def run_tests(command: str, cwd: str | Path | None = None) -> int:
    """Run ``command`` under bash (its output passed through) and return CI's verdict: its status,
    or 1 when it exited 0 without pytest having run a test."""
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=200)
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line.rstrip("\n"))
    rc = proc.wait()
    sys.stdout.flush()
    summary = summary_line(list(tail))
    if rc == NO_TESTS_COLLECTED:
        print(f"FAIL: pytest collected no tests (exit {rc}): {command}", file=sys.stderr)
        return rc
    if rc != 0:
        return rc
    if summary is None:
        print(f"FAIL: no pytest summary line in the output of: {command}", file=sys.stderr)
        return 1
    if passed_count(summary) == 0:
        print(f"FAIL: pytest ran no test ({summary}): {command}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: pytest_gate.py readme README SETUP_CMD TEST_CMD | pytest_gate.py run TEST_CMD"
    if len(argv) == 4 and argv[0] == "readme":
        problem = check_readme(Path(argv[1]), argv[2], argv[3])
        if problem:
            print(f"FAIL: {problem}", file=sys.stderr)
            return 1
        return 0
    if len(argv) == 2 and argv[0] == "run":
        return run_tests(argv[1])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
