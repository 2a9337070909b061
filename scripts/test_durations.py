"""Write tests/durations.json, the seconds each test file took, from a JUnit XML report of a suite run.

`make test` hands whole files to its two xdist workers in collection order (``--dist loadfile
--no-loadscope-reorder``); tests/conftest.py orders the files longest first by this table (the longest-processing-
time-first rule), so that the run does not end with one worker in a long file while the other has nothing left.
A file the table does not know counts as 0 s (it goes last, among the quick ones). Refresh the table after a
suite run when files are added or change much (the order only moves time around; no test reads these numbers):

    .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/suite.xml
    .venv/bin/python scripts/test_durations.py /tmp/suite.xml > tests/durations.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def file_seconds(junit_xml: str) -> dict[str, float]:
    """``{tests/…/test_x.py: seconds}``: each test case's time (set-up, call and tear-down) summed per file."""
    out: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit_xml).iter("testcase"):
        parts = [p for p in case.get("classname", "").split(".") if p and not p[0].isupper()]  # drop a class
        if parts:
            out["/".join(parts) + ".py"] += float(case.get("time") or 0.0)
    return dict(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: test_durations.py JUNIT_XML > tests/durations.json", file=sys.stderr)
        return 2
    seconds = file_seconds(argv[0])
    table = {name: round(s, 1) for name, s in sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0]))}
    json.dump(table, sys.stdout, indent=0)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
