"""Domain routes (ddk.teacher.routes): which rows go to which teacher, and the answer joined back in row order."""

from __future__ import annotations

import threading

import pytest
import torch

from ddk.teacher.client import TeacherOutput
from ddk.teacher.routes import DEFAULT_ROUTE, RoutedTeacher, join_outputs, route_of, route_plan


def test_route_of_and_plan_by_hand():
    routes = {"math": ["http://b"], "code": ["http://c"]}
    assert route_of("math", routes) == "math"
    assert route_of("prose", routes) == DEFAULT_ROUTE
    assert route_of(None, routes) == DEFAULT_ROUTE
    plan = route_plan(["prose", "math", "code", "math", "legal"], routes)
    assert plan == {DEFAULT_ROUTE: [0, 4], "math": [1, 3], "code": [2]}
    assert route_plan([], routes) == {}


class _Recorder:
    """A stand-in client: answers row r with ids filled by (marker, first input id), records what it got."""

    def __init__(self, marker: int):
        self.marker = marker
        self.calls: list[list[list[int]]] = []
        self.threads: set[str] = set()
        self.closed = False

    def topk(self, input_ids, top_k):
        rows = torch.as_tensor(input_ids)
        self.calls.append(rows.tolist())
        self.threads.add(threading.current_thread().name)
        b, length = rows.shape
        ids = torch.full((b, length - 1, top_k), self.marker, dtype=torch.int64)
        ids[:, :, 0] = rows[:, :1]  # which row this was
        lp = torch.full((b, length - 1, top_k), -float(self.marker), dtype=torch.float32)
        return TeacherOutput(ids=ids, logprobs=lp, target_logprob=rows[:, 1:].float())

    def close(self):
        self.closed = True


def test_routed_teacher_sends_each_domain_to_its_route_and_joins_in_order():
    made = {}

    def make(urls):
        made[tuple(urls)] = _Recorder(marker=len(made) + 1)
        return made[tuple(urls)]

    t = RoutedTeacher(["http://a"], {"math": ["http://b"], "legal": ["http://a"]}, make_client=make)
    assert len(made) == 2  # legal's route has the default's URLs: one client for both
    rows = torch.arange(5 * 4).view(5, 4)
    out = t.topk(rows, 3, domains=["prose", "math", "legal", "math", "code"])
    default, math = made[("http://a",)], made[("http://b",)]
    assert math.calls == [rows[[1, 3]].tolist()]
    assert sorted(default.calls[0]) == rows[[0, 2, 4]].tolist()
    # every row's answer came from its route and sits at its own index
    assert out.ids[:, 0, 0].tolist() == rows[:, 0].tolist()
    assert out.ids[:, 0, 1].tolist() == [1, 2, 1, 2, 1]
    assert out.logprobs[:, 0, 1].tolist() == [-1.0, -2.0, -1.0, -2.0, -1.0]
    assert torch.equal(out.target_logprob, rows[:, 1:].float())
    t.close()
    assert default.closed and math.closed


def test_one_route_is_one_plain_call_and_unrouted_without_default_is_an_error():
    made = []

    def make(urls):
        made.append(_Recorder(marker=7))
        return made[-1]

    t = RoutedTeacher([], {"math": ["http://b"]}, make_client=make)
    out = t.topk(torch.ones(2, 3, dtype=torch.long), 2, domains=["math", "math"])
    assert out.ids.shape == (2, 2, 2) and len(made[0].calls) == 1
    with pytest.raises(ValueError, match="prose"):
        t.topk(torch.ones(2, 3, dtype=torch.long), 2, domains=["math", "prose"])


def test_join_outputs_by_index():
    a = TeacherOutput(ids=torch.tensor([[[1]], [[3]]]), logprobs=torch.tensor([[[-1.0]], [[-3.0]]]),
                      target_logprob=torch.tensor([[-1.0], [-3.0]]))
    b = TeacherOutput(ids=torch.tensor([[[2]]]), logprobs=torch.tensor([[[-2.0]]]), target_logprob=torch.tensor([[-2.0]]))
    out = join_outputs({"x": ([0, 2], a), "y": ([1], b)}, 3)
    assert out.ids.flatten().tolist() == [1, 2, 3]
    assert out.logprobs.flatten().tolist() == [-1.0, -2.0, -3.0]
