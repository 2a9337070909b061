"""Rewrite tests/durations.json, the seconds each test module took, from a JUnit XML report of a full run:

    .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/suite.xml
    .venv/bin/python tests/durations.py /tmp/suite.xml "clean clone of <commit>, make test on <machine>"

conftest.py hands the modules out longest first by this table (after tests/e2e/), so that the two xdist workers end
together; a module not in it counts as 0 s and goes last. Nothing else reads it.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")


def module_seconds(report: Path) -> Counter:
    """Seconds per module file: the sum of its test cases' times (setup, call and teardown: pytest's default
    ``junit_duration_report = total``)."""
    seconds: Counter = Counter()
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        while module and not module[-1].startswith("test_"):  # drop a test class's name
            module.pop()
        if module:
            seconds["/".join(module) + ".py"] += float(case.get("time", 0))
    return seconds


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not Path(argv[0]).is_file():
        print("usage: python tests/durations.py REPORT.xml 'how it was measured'", file=sys.stderr)
        return 2
    seconds = module_seconds(Path(argv[0]))
    table = {"_measured": argv[1],
             "seconds": {m: round(s, 1) for m, s in seconds.most_common() if s >= 1.0}}
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{TABLE}: {len(table['seconds'])} modules of 1 s or more, {sum(seconds.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
