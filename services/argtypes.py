"""argparse types that check a flag's range as it is parsed (pure: no I/O, the standard library only).

Every numeric, host and URL flag of ``ddk`` (``ddk.cli``) takes one of these as its ``type``, so a value
out of range stops the command before anything starts: argparse prints one line naming the flag and the
allowed range, e.g. ``ddk controller serve: error: argument --port: must be an integer in 1..65535, got
99999``, and exits 2. This module is the one place that declares the ranges of the command line (the train
config's keys are ranged by its pydantic models, ``ddk.trainer.config``).

Each type has a ``rule`` (``"an integer in 1..65535"``): ``ddk.cli`` appends it to the flag's ``--help`` text.
The numeric ones also list ``bad_values()``, values just outside the range, which the tests walk.

Ports are 1..65535: 0 ("any free port") is refused, because the services log and report the port they were
given, so with 0 nobody would know where they listen (the launcher and the tests pick a free port themselves).

Paths are not checked here: a command line is parsed where it is written too (the deploy files' commands are
parsed by the tests on a machine without their folders), so each service checks its paths as it starts, before
it opens anything (``ddk controller serve --db`` in a missing folder: exit 2 naming ``--db``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import re
from urllib.parse import urlsplit


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class IntRange:
    """An integer in ``lo..hi`` (either bound may be None: unbounded)."""

    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        if lo is not None and hi is not None:
            self.rule = f"an integer in {lo}..{hi}"
        elif lo is not None:
            self.rule = f"an integer >= {lo}"
        elif hi is not None:
            self.rule = f"an integer <= {hi}"
        else:
            self.rule = "an integer"
        self.__name__ = self.rule  # what argparse names the type in messages it writes itself

    def __call__(self, text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {text!r}") from None
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {value}")
        return value

    def bad_values(self) -> list[str]:
        out = [str(self.lo - 1)] if self.lo is not None else []
        return out + ([str(self.hi + 1)] if self.hi is not None else []) + ["x"]

    def __repr__(self) -> str:
        return f"IntRange({self.lo}, {self.hi})"


class FloatRange:
    """A finite number between ``lo`` and ``hi`` (None: unbounded); ``lo_open``/``hi_open`` exclude the bound."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            self.rule = f"a number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
        elif lo is not None:
            self.rule = f"a number {'>' if lo_open else '>='} {_fmt(lo)}"
        elif hi is not None:
            self.rule = f"a number {'<' if hi_open else '<='} {_fmt(hi)}"
        else:
            self.rule = "a finite number"
        self.__name__ = self.rule

    def __call__(self, text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {text!r}") from None
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if not math.isfinite(value) or low_bad or high_bad:
            raise argparse.ArgumentTypeError(f"must be {self.rule}, got {text}")
        return value

    def bad_values(self) -> list[str]:
        out = []
        if self.lo is not None:
            out.append(_fmt(self.lo) if self.lo_open else _fmt(self.lo - 1))
        if self.hi is not None:
            out.append(_fmt(self.hi) if self.hi_open else _fmt(self.hi + 1))
        return out + ["nan", "inf", "x"]

    def __repr__(self) -> str:
        return f"FloatRange({self.lo}, {self.hi}, lo_open={self.lo_open}, hi_open={self.hi_open})"


port = IntRange(1, 65535)
seed = IntRange(0, 2**32 - 1)  # numpy's seeds are 32-bit
positive = IntRange(1)  # counts, sizes, steps

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host_problem(text: str) -> str | None:
    """None when ``text`` is an IPv4/IPv6 address or an RFC 1123 host name; else why not."""
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):  # a dotted quad with an octet over 255 is not a host name either
        return "not a valid IPv4 address"
    if ":" in text:
        return "not a valid IPv6 address"
    name = text.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(lb) for lb in labels):
        return "not a valid host name (letters, digits, '-'; dot-separated labels of 1-63 characters)"
    if labels[-1].isdigit():
        return "not a valid host name (its last label is all digits)"
    return None


def host(text: str) -> str:
    """An address to listen on or to reach: an IPv4/IPv6 literal (``127.0.0.1``, ``::1``) or a host name."""
    problem = _host_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"must be {host.rule}, got {text!r}: {problem}")
    return text


host.rule = "an IPv4/IPv6 address or a host name"


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a valid host and, when given, a port in 1..65535."""
    rule = http_url.rule
    try:
        u = urlsplit(text)
        port_ = u.port
    except ValueError as e:  # a port out of range or not a number, a bad [IPv6] literal
        detail = "port not in 1..65535" if "port" in str(e).lower() else str(e)
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}: {detail}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    problem = _host_problem(u.hostname)
    if problem:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}: host {problem}")
    if port_ is not None and not 1 <= port_ <= 65535:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}: port not in 1..65535")
    return text


http_url.rule = "an http:// or https:// URL (port 1..65535)"

def route(text: str) -> tuple[str, str]:
    """``DOMAIN=URL`` (``ddk eval --route``): a domain name and its teacher's http(s) URL."""
    domain, sep, url = text.partition("=")
    if not sep or not domain.strip():
        raise argparse.ArgumentTypeError(f"must be DOMAIN=URL, got {text!r}")
    return domain.strip(), http_url(url.strip())


route.rule = "DOMAIN=URL with an http:// or https:// URL"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """A logging level name, any case (``debug``, ``INFO``) -> its upper-case name."""
    name = str(text).strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LOG_LEVELS or not isinstance(logging.getLevelName(name), int):
        raise argparse.ArgumentTypeError(f"must be {log_level.rule}, got {text!r}")
    return name


log_level.rule = f"one of {', '.join(LOG_LEVELS)} (any case)"
