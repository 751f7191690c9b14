"""CI cannot go green without tests: the README's test block is the command `.ci/run` runs, a pytest
run that ran no test fails the gate, and a required dependency's importorskip fails under CI=true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from path_import import import_path
import required_imports

ROOT = Path(__file__).resolve().parents[1]


gate = import_path(ROOT / ".ci" / "pytest_gate.py", "pytest_gate")


def _ci_run_commands() -> tuple[str, str]:
    text = (ROOT / ".ci" / "run").read_text()
    found = {m.group(1): m.group(2) for m in re.finditer(r"^(setup_cmd|test_cmd)='([^']*)'$", text, re.M)}
    return found["setup_cmd"], found["test_cmd"]


def test_readme_test_block_is_what_ci_runs():
    setup, test = _ci_run_commands()
    assert gate.check_readme(ROOT / "README.md", setup, test) is None
    text = (ROOT / ".ci" / "run").read_text()
    assert 'pytest_gate.py readme README.md "$setup_cmd" "$test_cmd"' in text
    assert 'pytest_gate.py run "$test_cmd"' in text
    assert "awk" not in text  # the command is fixed in the script, not read out of the README


def test_a_different_readme_command_fails_with_both_commands(tmp_path):
    setup, test = _ci_run_commands()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n```\n{setup}\n```\n\ntext\n\n```bash\n{setup}\npython -m pytest -q tests/test_x.py\n```\n")
    problem = gate.check_readme(readme, setup, test)
    assert problem is not None and "tests/test_x.py" in problem and test in problem and "test_cmd" in problem
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "pytest_gate.py"), "readme", str(readme), setup, test],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "FAIL:" in out.stderr
    readme.write_text("no blocks at all\n")
    assert "None" in gate.check_readme(readme, setup, test)


def test_readme_block_reads_the_second_fenced_block():
    text = "a\n```\none\n```\nb\n```bash\ntwo\nthree\n```\n```\nfour\n```\n"
    assert gate.readme_block(text) == "two\nthree"
    assert gate.readme_block(text, 3) == "four"
    assert gate.readme_block(text, 4) is None


def _gate_run(tests: Path, *extra: str) -> subprocess.CompletedProcess:
    command = " ".join([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(tests)])
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "pytest_gate.py"), "run", command],
                          cwd=tests.parent, capture_output=True, text=True, timeout=120)


def test_a_run_that_collected_no_test_fails(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_nothing.py").write_text("def helper():\n    return 1\n")
    out = _gate_run(tests)
    assert out.returncode == 5, out.stdout + out.stderr
    assert "collected no tests" in out.stderr


def test_a_run_that_only_skipped_or_deselected_fails(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_skips.py").write_text("import pytest\n\n\ndef test_a():\n    pytest.skip('not here')\n")
    out = _gate_run(tests)
    assert out.returncode == 1 and "ran no test" in out.stderr, out.stdout + out.stderr
    (tests / "test_skips.py").write_text("def test_a():\n    pass\n")
    assert _gate_run(tests, "-k", "nomatch").returncode != 0


def test_a_run_with_a_passing_test_passes_and_a_failing_one_fails(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_ok.py").write_text("import pytest\n\n\ndef test_a():\n    pass\n\n\ndef test_b():\n    pytest.skip('x')\n")
    out = _gate_run(tests)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 skipped" in out.stdout  # the output passes through
    (tests / "test_ok.py").write_text("def test_a():\n    assert False\n")
    assert _gate_run(tests).returncode == 1


def test_summary_line_parsing():
    assert gate.summary_line(["x", "3 passed, 1 skipped, 2 warnings in 0.12s", ""]) == "3 passed, 1 skipped, 2 warnings"
    assert gate.summary_line(["==== 2 failed, 5 passed in 62.01s (0:01:02) ===="]) == "2 failed, 5 passed"
    assert gate.summary_line(["no tests ran in 0.01s"]) == "no tests ran"
    assert gate.summary_line(["....  [100%]"]) is None
    assert gate.passed_count("2 failed, 5 passed") == 5 and gate.passed_count("4 skipped") == 0


def test_required_modules_come_from_requirements():
    required = required_imports.required_modules()
    assert {"torch", "deepspeed", "webdataset", "sentencepiece", "mpi4py", "PIL", "yaml"} <= required


def test_importorskip_of_a_required_package_fails_under_ci(monkeypatch):
    assert pytest.importorskip is required_imports.importorskip  # conftest installed it
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required"):
        pytest.importorskip("deepspeed.no_such_module_here")
    with pytest.raises(pytest.skip.Exception):  # not a requirement: still an optional skip
        pytest.importorskip("no_such_package_here")
    assert pytest.importorskip("webdataset").__name__ == "webdataset"


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_importorskip_skips_outside_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception):
        pytest.importorskip("deepspeed.no_such_module_here")
