"""The quiet console (ddk.logsetup) and the training progress bar (ddk.trainer.launch.Progress)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from ddk.logsetup import DETAIL_ENV, ConsoleFormatter, QuietFilter, add_log_file, detail_mode, remove_log_file
from ddk.trainer.launch import Progress


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_the_console_drops_per_request_lines_and_harmless_warnings_only():
    f = QuietFilter()
    assert not f.filter(_record("httpx", logging.INFO, 'HTTP Request: GET http://x/healthz "HTTP/1.1 503"'))
    assert not f.filter(_record("uvicorn.access", logging.INFO, '127.0.0.1 - "GET /healthz" 200'))
    assert not f.filter(_record("transformers.tokenization_utils_base", logging.WARNING,
                                "Token indices sequence length is longer than the specified maximum (481 > 256)"))
    assert f.filter(_record("httpx", logging.WARNING, "something a person should see"))
    assert f.filter(_record("ddk.launcher", logging.INFO, "started teacher (pid 1, port 2)"))
    assert f.filter(_record("ddk.trainer", logging.WARNING, "controller unreachable (x)"))
    assert f.filter(_record("transformers.modeling_utils", logging.WARNING, "Some weights were not initialized"))


def test_console_lines_are_short_and_warnings_name_their_logger():
    fmt = ConsoleFormatter()
    info = fmt.format(_record("ddk.launcher", logging.INFO, "started teacher"))
    warn = fmt.format(_record("ddk.trainer", logging.WARNING, "controller unreachable"))
    assert info.endswith(" started teacher") and len(info) == len("HH:MM:SS started teacher")
    assert warn.endswith(" WARNING ddk.trainer: controller unreachable")


def test_detail_mode_at_debug_or_in_a_child_writing_a_log_file(monkeypatch):
    monkeypatch.delenv(DETAIL_ENV, raising=False)
    assert not detail_mode("INFO") and detail_mode("DEBUG") and detail_mode(logging.DEBUG)
    monkeypatch.setenv(DETAIL_ENV, "1")
    assert detail_mode("INFO")


def test_the_launcher_starts_children_with_a_log_file_in_detail_mode(tmp_path):
    from ddk.launcher import Child

    code = f"import os; print(os.environ.get({DETAIL_ENV!r}))"
    with_log = Child(["-c", code], tmp_path / "child.log", program=[sys.executable]).start()
    assert with_log.wait(30) == 0 and with_log.log_text().strip() == "1"
    override = Child(["-c", code], tmp_path / "other.log", env={DETAIL_ENV: "0"}, program=[sys.executable]).start()
    assert override.wait(30) == 0 and override.log_text().strip() == "0"


def test_a_quiet_cli_keeps_the_requests_off_the_console_and_debug_brings_them_back(tmp_path):
    """`ddk` as a person runs it: the quiet console, and the complete log file of add_log_file."""
    script = (
        "import logging, sys\n"
        "from ddk.logsetup import setup_logging, add_log_file\n"
        f"setup_logging(sys.argv[1]); add_log_file({str(tmp_path / 'all.log')!r})\n"
        "logging.getLogger('httpx').info('HTTP Request: GET /healthz 503')\n"
        "logging.getLogger('ddk.launcher').info('started teacher')\n")
    env = {"PATH": "/usr/bin:/bin"}
    quiet = subprocess.run([sys.executable, "-c", script, "INFO"], capture_output=True, text=True, env=env, timeout=60)
    assert "started teacher" in quiet.stderr and "HTTP Request" not in quiet.stderr, quiet.stderr
    assert "HTTP Request" in (tmp_path / "all.log").read_text()  # the log file has every line
    loud = subprocess.run([sys.executable, "-c", script, "DEBUG"], capture_output=True, text=True, env=env, timeout=60)
    assert "INFO httpx: HTTP Request" in loud.stderr and "INFO ddk.launcher: started teacher" in loud.stderr


def test_add_log_file_takes_every_record_and_comes_off_again(tmp_path):
    logger = logging.getLogger("ddk.test-console")
    # a record must pass its own logger's level first: vLLM's logging set-up (an in-process engine of an earlier
    # test in this worker) sets httpx's to WARNING (vllm/logger.py), which no handler can undo; here it has none
    httpx_logger = logging.getLogger("httpx")
    httpx_level, httpx_logger.level = httpx_logger.level, logging.NOTSET
    handler = add_log_file(tmp_path / "x.log")
    try:
        httpx_logger.info("a request")
        logger.info("a ddk line")
    finally:
        remove_log_file(handler)
        httpx_logger.setLevel(httpx_level)
    logger.info("after")
    text = (tmp_path / "x.log").read_text()
    assert "INFO httpx: a request" in text and "INFO ddk.test-console: a ddk line" in text and "after" not in text


# ----------------------------------------------------------------------------- the progress bar

def _step(step: int, **kw) -> dict:
    return {"event": "step", "step": step, "loss": 5.0 - step / 10, "tokens_per_s": 1000.0, "step_s": 0.1,
            "version": 1, **kw}


@pytest.mark.timeout(30)
def test_progress_shows_steps_of_total_and_closes_at_the_end(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(_step(9)) + "\n")  # a previous attempt's line: skipped
    progress = Progress(metrics, total=4)
    progress.start()
    time.sleep(0.3)
    metrics.write_text("")  # rank 0 truncates it on its fresh start (seen at the next poll), then writes
    time.sleep(0.8)
    with open(metrics, "a") as fh:
        for r in ([{"event": "eval", "step": 0, "version": 1}] + [_step(s) for s in range(1, 4)]
                  + [{"event": "eval", "step": 3, "version": None}, _step(4),
                     {"event": "eval", "step": 4, "version": 2, "warning": "within their standard errors"},
                     {"event": "end", "step": 4}]):
            fh.write(json.dumps(r) + "\n")
    progress.join(timeout=10)
    assert not progress.is_alive()  # the end line ends it
    out, err = capsys.readouterr()
    assert "4/4" in err and "loss=4.600" in err and "tok_s=1000" in err and "v=1" in err
    assert "9/4" not in err
    assert "step 3: controller unreachable, keeping the previous weights" in out + err
    assert "step 4: the mixture is steering by noise; raise eval tokens" in out + err  # once, with the eval
    assert (out + err).count("steering by noise") == 1


# ----------------------------------------------------------------------------- the Ray Train workers' console

def test_a_worker_console_keeps_ddk_lines_and_warnings_only(tmp_path):
    """setup_worker_logging in a process configured as Ray Train configures its workers (root at INFO with a
    stderr handler and a log file handler): quiet, the console keeps ddk's INFO lines and every warning, and
    drops the libraries' INFO lines (httpx's per-request lines; Ray Train's per-report line, logged under a
    logger named by its file path); the file keeps everything; at DEBUG the console has them all again."""
    script = (
        "import logging, sys\n"
        "root = logging.getLogger(); root.setLevel(logging.INFO)\n"
        "root.addHandler(logging.StreamHandler(sys.stderr))\n"
        f"root.addHandler(logging.FileHandler({str(tmp_path / 'app.log')!r}))\n"
        "from ddk.logsetup import setup_worker_logging\n"
        "setup_worker_logging(sys.argv[1])\n"
        "logging.getLogger('httpx').info('HTTP Request: POST http://x/v1/topk')\n"
        "logging.getLogger('/x/ray/train/v2/_internal/execution/context.py').info('Reporting training result 1')\n"
        "logging.getLogger('ddk.trainer').info('rank 0: resumed from step 8')\n"
        "logging.getLogger('torch.distributed').warning('a library warning')\n"
        "logging.getLogger('httpcore').debug('a debug line')\n")
    env = {"PATH": "/usr/bin:/bin"}
    quiet = subprocess.run([sys.executable, "-c", script, "INFO"], capture_output=True, text=True, env=env, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == ["rank 0: resumed from step 8", "a library warning"]
    logged = (tmp_path / "app.log").read_text()
    assert "HTTP Request" in logged and "Reporting training result" in logged and "a debug line" not in logged
    loud = subprocess.run([sys.executable, "-c", script, "DEBUG"], capture_output=True, text=True, env=env, timeout=60)
    assert loud.stderr.splitlines() == ["HTTP Request: POST http://x/v1/topk", "Reporting training result 1",
                                        "rank 0: resumed from step 8", "a library warning", "a debug line"]


def test_ray_train_own_lines_are_off_unless_detail(monkeypatch):
    from ddk.logsetup import ray_train_log_level

    monkeypatch.delenv(DETAIL_ENV, raising=False)
    assert ray_train_log_level("INFO") == "WARNING" and ray_train_log_level("WARNING") == "WARNING"
    assert ray_train_log_level("DEBUG") == "DEBUG"
    monkeypatch.setenv(DETAIL_ENV, "1")  # a child writing a log file: complete
    assert ray_train_log_level("INFO") == "INFO"
