"""Figures from a compute-sanitizer log: the tool's error count, and whether its summary line came.

memcheck and synccheck end with ``ERROR SUMMARY: N errors``; racecheck with ``RACECHECK SUMMARY:
N hazards displayed (E errors, W warnings)``. Exit status 0 only when the summary line is there,
it counts no errors and the program under the tool exited 0 (``--rc``).

    python benchmarks/gpu_check/sanitizer_log.py LOG --tool memcheck --rc 0 [--out figures.json]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from timing import write_figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--tool", required=True)
    ap.add_argument("--rc", type=int, required=True, help="exit status of compute-sanitizer")
    ap.add_argument("--out")
    a = ap.parse_args()
    text = Path(a.log).read_text(errors="replace") if Path(a.log).exists() else ""
    figures: dict = {"tool": a.tool, "exit_status": a.rc}
    race = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    errors = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if race:
        hazards, errs, warns = map(int, race[-1])
        figures.update({"hazards": hazards, "errors": errs, "warnings": warns})
    elif errors:
        figures["errors"] = int(errors[-1])
    figures["summary_line_found"] = bool(race or errors)
    cases = re.findall(r"^(ok|FAIL)  ", text, flags=re.M)
    figures["cases_passed"] = cases.count("ok")
    figures["cases_failed"] = cases.count("FAIL")
    unsupported = re.search(r"Device not supported|Target application returned an error|error 999", text)
    if unsupported:
        figures["notes"] = [f"sanitizer said: {unsupported.group(0)}"]
    write_figures(a.out, figures)
    ok = figures["summary_line_found"] and figures.get("errors", 1) == 0 and a.rc == 0 and not figures["cases_failed"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
