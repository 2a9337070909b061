"""Write the pip constraints for an image build: constraints.txt, with the base image's versions kept.

Why: the vLLM image ships a CUDA build of torch, vLLM and their kernels (triton, flashinfer, ...)
that must move together. Installing ddk on top must not replace any of them, so every package
already installed in the image is pinned at its installed version; constraints.txt pins only what
the image lacks. Usage (in a Dockerfile):

    python3 pins.py constraints.txt --keep-installed > /tmp/pins.txt
    pip install -c /tmp/pins.txt '.[gpu]'

Without --keep-installed it only normalises constraints.txt (drops comments and blank lines).
Standard library only, so it runs in any base image before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. become one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    """{canonical name: 'name==version'} from a constraints file of exact pins."""
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise SystemExit(f"{path}: not an exact pin: {line!r}")
            pins[canonical(name.strip())] = f"{name.strip()}=={version.strip()}"
    return pins


def installed() -> dict[str, str]:
    """{canonical name: 'name==version'} for every distribution importable here."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), f"{name}=={dist.version}")
    return found


def merge(pins: dict[str, str], keep: dict[str, str]) -> list[str]:
    """The pins, with every package in ``keep`` at its kept version instead; sorted by name."""
    merged = {**pins, **keep}
    return [merged[name] for name in sorted(merged)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints", help="constraints.txt (exact pins)")
    parser.add_argument("--keep-installed", action="store_true",
                        help="pin every package already installed at its installed version")
    args = parser.parse_args(argv)
    keep = installed() if args.keep_installed else {}
    sys.stdout.write("".join(line + "\n" for line in merge(read_pins(args.constraints), keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
