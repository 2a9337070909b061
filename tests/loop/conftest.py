"""Fixtures of the loop tests (their helpers are in inproc.py)."""

from __future__ import annotations

import logging

import pytest

from inproc import LogCapture


@pytest.fixture
def ddk_log():
    """Capture the ddk loggers at INFO for the test."""
    handler, logger = LogCapture(), logging.getLogger("ddk")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
