"""Process logging: a quiet console for a person, complete log files.

The console (stderr) shows what a person follows: what starts and stops (one line each), progress bars,
warnings and results, as ``HH:MM:SS message`` lines (warnings and errors name their logger). Left out there:

* per-request lines of the HTTP clients and servers (``httpx``, ``httpcore``, ``uvicorn.access``,
  ``urllib3``) below WARNING: every health poll, every ``/v1/topk`` call;
* the "Loading weights" / "Writing model shards" bars of transformers (``HF_HUB_DISABLE_PROGRESS_BARS``);
* transformers' warning that a text is longer than the model's positions: the data is cut into blocks of
  ``data.seq_len`` tokens after tokenising whole documents, so it is expected and harmless.

All of it comes back with ``ddk --log-level DEBUG``, and in *detail* mode, which the launcher turns on for
every child it starts with a log file (``DDK_LOG_DETAIL=1``): ``logs/*.log`` stay complete, in the full
``time LEVEL logger: message`` format. :func:`add_log_file` gives a process a complete log file of its own
next to a quiet console (``ddk demo`` writes ``logs/demo.log``).

``setup_logging`` is called once by ``ddk.cli.main`` (the entry point); importing this module changes nothing.

The same rule holds in the Ray Train workers of ``ddk train``, whose console Ray forwards to the driver's
(``(RayTrainWorker pid=...)`` lines): :func:`setup_worker_logging` applies it at the start of the worker
function, at the driver's level (``TrainJob.log_level``), to the console handler that Ray Train put on the
root logger; Ray Train's own per-report lines (``Reporting training result``, ``Checkpoint successfully
created``) are turned off by Ray's setting for them, ``RunConfig(logging_config=LoggingConfig(log_level=...))``
(:func:`ray_train_log_level`), which the driver sets, and by the workers' console filter, which keeps every
library below WARNING (:class:`WorkerQuietFilter`; Ray 2.60 logs the per-report line outside ``ray.train``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DETAIL_ENV = "DDK_LOG_DETAIL"  # "1": this process's output is a log file: keep every line
DETAIL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_LOGGERS = ("httpx", "httpcore", "uvicorn.access", "urllib3")
# (logger, start of message) of warnings that need no action, left off the console
HARMLESS_WARNINGS = (
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than"),
)


def parse_level(level: str | int) -> int:
    """'info', 'DEBUG', 20 -> a logging level (INFO when unknown)."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    return value if isinstance(value, int) else logging.INFO


def detail_mode(level: str | int = logging.INFO) -> bool:
    """Whether this process logs everything: at DEBUG, or when ``DDK_LOG_DETAIL=1`` (output to a log file)."""
    return parse_level(level) <= logging.DEBUG or os.environ.get(DETAIL_ENV) == "1"


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and worse as ``HH:MM:SS WARNING logger: message``."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        self._style._fmt = ("%(asctime)s %(message)s" if record.levelno < logging.WARNING
                            else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        return super().format(record)


class QuietFilter(logging.Filter):
    """Drops per-request records (``REQUEST_LOGGERS`` below WARNING) and the ``HARMLESS_WARNINGS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.startswith(REQUEST_LOGGERS):
            return False
        for name, start in HARMLESS_WARNINGS:
            if record.name == name and str(record.msg).startswith(start):
                return False
        return True


_QUIET = QuietFilter()


class WorkerQuietFilter(QuietFilter):
    """The workers' console: :class:`QuietFilter`, and every logger outside ddk below WARNING. A Ray Train
    worker's console carries the libraries' INFO records (Ray Train sets the root logger to INFO there), among
    them Ray Train's ``Reporting training result ...`` per report, which Ray 2.60 logs under a logger named by
    its file path (``logging.getLogger(__file__)`` in ray/train/v2/_internal/execution/context.py), so its own
    ``LoggingConfig`` (which filters the ``ray.train`` loggers) does not reach it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not (record.name == "ddk" or record.name.startswith("ddk.")):
            return False
        return super().filter(record)


_WORKER_QUIET = WorkerQuietFilter()


def setup_logging(level: str | int = "INFO") -> bool:
    """Configure this process's logging for ``--log-level level``; whether it is in detail mode.

    As ``logging.basicConfig``: adds a stderr handler only when the root logger has none (an embedding
    program's or pytest's handlers are left alone). Quiet mode (not detail) filters that handler and the
    transformers loggers of the harmless warnings, and turns transformers' progress bars off (inherited by
    the children; they are progress of loading files, not of the job).
    """
    lvl = parse_level(level)
    detail = detail_mode(lvl)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        if detail:
            handler.setFormatter(logging.Formatter(DETAIL_FORMAT))
        else:
            handler.setFormatter(ConsoleFormatter())
            handler.addFilter(_QUIET)
        handler.setLevel(lvl)
        root.addHandler(handler)
        root.setLevel(lvl)
    if not detail:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name, _ in HARMLESS_WARNINGS:  # transformers logs through its own handler: filter at the logger
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)
    return detail


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the process's stderr or stdout (not a file, not a capture buffer)."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    # Ray's PlainRayHandler writes to whatever sys.stderr is at emit time (its stream attribute is stderr too)
    return (type(handler).__name__ == "PlainRayHandler"
            or getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def setup_worker_logging(level: str | int = "INFO") -> bool:
    """:func:`setup_logging` in a process whose logging a framework configured already: a Ray Train worker,
    where Ray Train puts a console handler (stderr, forwarded to the driver's console) and a log file handler
    on the root logger at INFO before the worker function runs. The console rule goes onto the console
    handlers (the level, and in quiet mode the filter of per-request lines and harmless warnings); the file
    handlers keep every record. Without handlers on the root logger it is :func:`setup_logging`. Returns
    whether the process is in detail mode. Quiet, the console drops every library record below WARNING
    (:class:`WorkerQuietFilter`): the workers' console is ddk's lines, warnings and errors."""
    root = logging.getLogger()
    if not root.handlers:
        return setup_logging(level)
    lvl = parse_level(level)
    detail = detail_mode(lvl)
    for handler in root.handlers:
        if _is_console(handler):
            handler.setLevel(lvl)
            if not detail and _WORKER_QUIET not in handler.filters:
                handler.addFilter(_WORKER_QUIET)
    if root.level > lvl:  # --log-level DEBUG: the records below the framework's INFO too
        root.setLevel(lvl)
    if not detail:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name, _ in HARMLESS_WARNINGS:
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)
    return detail


def ray_train_log_level(level: str | int = "INFO") -> str:
    """The level of Ray Train's own ``ray.train`` console lines (``ray.train.LoggingConfig(log_level=...)``)
    for a driver at ``level``: WARNING on a quiet console (its per-report and checkpoint lines are INFO), the
    level itself in detail mode (``--log-level DEBUG``, or output to a log file)."""
    lvl = parse_level(level)
    return logging.getLevelName(lvl) if detail_mode(lvl) else "WARNING"


def add_log_file(path: str | Path, level: str | int = logging.INFO) -> logging.Handler:
    """Every record of this process from ``level`` up (the console's filters do not apply) also in ``path``
    (appended), in the detail format. Returns the handler (``remove_log_file`` takes it off again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(DETAIL_FORMAT))
    lvl = parse_level(level)
    handler.setLevel(lvl)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > lvl:  # the console's handler keeps its own level
        for h in root.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(root.level)
        root.setLevel(lvl)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
