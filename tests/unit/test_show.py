"""``ddk weights``'s table with the latest evaluation's ratios and their 95 % intervals (ddk.controller.show, pure)."""

from __future__ import annotations

import math

from ddk.controller.show import format_weights, ratio_interval

WEIGHTS = {"version": 2, "step": 10, "weights": {"a": 0.25, "b": 0.75}, "updated_at": "2026-12-06T00:00:00.000Z"}


def test_the_interval_is_on_the_log_scale():
    # q = e, se(log q) = 0.5: exp(1 -/+ 0.98) = (e^0.02, e^1.98) = (1.0202, 7.2427)
    lo, hi = ratio_interval(math.e, 0.5)
    assert (round(lo, 4), round(hi, 4)) == (1.0202, 7.2427)
    assert ratio_interval(2.0, 0.0) == (2.0, 2.0) and ratio_interval(2.0, None) is None


def test_weights_table_with_ratios_intervals_and_the_warning():
    evaluation = {"version": 2, "step": 10, "ratio": {"a": math.e, "b": 2.0}, "log_ratio_se": {"a": 0.5},
                  "warning": "the mixture is steering by noise; raise eval tokens"}
    lines = format_weights("r", WEIGHTS, evaluation).splitlines()
    assert lines[0] == "run r: version 2 at step 10, updated 2026-12-06T00:00:00.000Z"
    assert lines[1].split() == ["domain", "weight", "ratio", "95%", "interval", "se(log", "q)"]
    assert lines[3].split() == ["a", "0.2500", "2.7183", "1.0202-7.2427", "0.5000"]
    assert lines[4].split() == ["b", "0.7500", "2.0000", "-", "-"]  # b evaluated on a single document: no se
    assert lines[5] == "warning: the mixture is steering by noise; raise eval tokens"
    # no evaluation (or one without ratios): the table as before
    assert format_weights("r", WEIGHTS, None) == format_weights("r", WEIGHTS)
    assert format_weights("r", WEIGHTS).splitlines()[1].split() == ["domain", "weight"]
    assert "warning" not in format_weights("r", WEIGHTS, {**evaluation, "warning": None})


def test_another_signal_is_named_and_its_column_is_q():
    """A run steered by ``mixture.signal: accuracy``: the table says what q is and heads the column q, not ratio."""
    evaluation = {"version": 2, "step": 10, "ratio": {"a": 1.5, "b": 1.0}, "signal": "accuracy"}
    lines = format_weights("r", WEIGHTS, evaluation).splitlines()
    assert lines[1] == "q is the accuracy gap (acc_T+e)/(acc_S+e) (mixture.signal: accuracy)"
    assert lines[2].split()[:3] == ["domain", "weight", "q"]
    assert lines[4].split() == ["a", "0.2500", "1.5000", "-", "-"]
    # the ratio signal, named or not, reads as before
    assert format_weights("r", WEIGHTS, {**evaluation, "signal": "ratio"}).splitlines()[1].split()[2] == "ratio"
