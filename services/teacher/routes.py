"""Domain-routed teachers: each domain's rows go to the teacher that teaches that domain.

``teacher.routes: {domain: [url, ...]}`` in the train config gives a domain its own teacher replicas; a domain
without a route uses ``teacher.urls``. :class:`RoutedTeacher` holds one :class:`~ddk.teacher.client.TeacherClient`
per distinct set of URLs (so failover and retries work per route, exactly as for plain replicas) and answers
``topk(input_ids, top_k, domains=[...])``: the batch's rows are grouped by route, the groups are sent in
parallel, and the answers are joined back in row order. Without ``domains`` every row goes to the default route.

The pure part, :func:`route_plan`, says which rows go where; it is what the tests check by hand.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from .client import TeacherClient, TeacherOutput

DEFAULT_ROUTE = ""  # the route name of ``teacher.urls``


def route_of(domain: str | None, routes: dict[str, Sequence[str]]) -> str:
    """The route (a domain name, or :data:`DEFAULT_ROUTE`) that serves ``domain``."""
    return domain if domain is not None and domain in routes else DEFAULT_ROUTE


def route_plan(domains: Sequence[str | None], routes: dict[str, Sequence[str]]) -> dict[str, list[int]]:
    """Row indices per route, each list in row order; routes without rows are absent."""
    plan: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        plan.setdefault(route_of(d, routes), []).append(i)
    return plan


def join_outputs(parts: dict[Any, tuple[list[int], TeacherOutput]], rows: int) -> TeacherOutput:
    """One :class:`TeacherOutput` for ``rows`` rows from the per-route answers (their rows given by index)."""
    first = next(iter(parts.values()))[1]
    out = TeacherOutput(ids=first.ids.new_empty((rows, *first.ids.shape[1:])),
                        logprobs=first.logprobs.new_empty((rows, *first.logprobs.shape[1:])),
                        target_logprob=first.target_logprob.new_empty((rows, *first.target_logprob.shape[1:])))
    for index, part in parts.values():
        idx = torch.tensor(index, dtype=torch.long)
        out.ids[idx] = part.ids
        out.logprobs[idx] = part.logprobs
        out.target_logprob[idx] = part.target_logprob
    return out


def ask(teacher, input_ids, top_k: int, domains: Sequence[str | None]) -> TeacherOutput:
    """``teacher.topk`` for rows of ``domains``: routed by domain when the teacher routes (RoutedTeacher), the
    plain call for any other teacher (a TeacherClient, the top-k store)."""
    if isinstance(teacher, RoutedTeacher):
        return teacher.topk(input_ids, top_k, domains=domains)
    return teacher.topk(input_ids, top_k)


class RoutedTeacher:
    """``topk`` with rows routed by domain; the same interface as TeacherClient plus ``domains=``.

    ``urls``: the default replicas (may be empty when every domain that is asked for has a route);
    ``routes``: domain -> its replicas; ``make_client``: builds one client per route (the trainer passes the
    token and timeouts through it).
    """

    def __init__(self, urls: Sequence[str], routes: dict[str, Sequence[str]] | None = None,
                 make_client: Callable[[list[str]], TeacherClient] = TeacherClient) -> None:
        self.urls = list(urls)
        self.routes = {d: list(u) for d, u in (routes or {}).items()}
        by_urls: dict[tuple[str, ...], TeacherClient] = {}
        self.clients: dict[str, TeacherClient] = {}
        for name, route_urls in [(DEFAULT_ROUTE, list(urls))] + list(self.routes.items()):
            if not route_urls:
                continue
            key = tuple(route_urls)
            if key not in by_urls:
                by_urls[key] = make_client(list(route_urls))
            self.clients[name] = by_urls[key]
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(by_urls)), thread_name_prefix="ddk-route")

    def urls_of(self, domain: str | None) -> list[str]:
        """The replicas that serve ``domain``."""
        name = route_of(domain, self.routes)
        return self.routes[name] if name else self.urls

    def route_domains(self) -> list[str | None]:
        """One domain per configured teacher, to check each once (its /v1/info) and name it in an error: None for
        the default replicas when there are any, then every routed domain in name order."""
        return ([None] if self.urls else []) + sorted(self.routes)

    def client(self, domain: str | None = None) -> TeacherClient:
        """The client that serves ``domain`` (the default route's for None or an unrouted domain)."""
        name = route_of(domain, self.routes)
        if name not in self.clients:
            raise ValueError(f"teacher.urls: domain {domain!r} has no route and no default teacher is configured")
        return self.clients[name]

    def info(self) -> dict:
        return self.client(None).info() if DEFAULT_ROUTE in self.clients else next(iter(self.clients.values())).info()

    def topk(self, input_ids, top_k: int, domains: Sequence[str | None] | None = None) -> TeacherOutput:
        rows = len(input_ids)
        groups: dict[int, tuple[TeacherClient, list[int]]] = {}  # routes sharing their URLs share one call
        for name, index in route_plan(domains if domains is not None else [None] * rows, self.routes).items():
            # the route's domain; for the default route, one of its domains (so an error can name it)
            client = self.client(domains[index[0]] if domains is not None else None)
            groups.setdefault(id(client), (client, []))[1].extend(index)
        if len(groups) == 1:
            (client, _), = groups.values()
            return client.topk(input_ids, top_k)
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        futures = {key: (sorted(index), self._pool.submit(client.topk, ids[sorted(index)], top_k))
                   for key, (client, index) in groups.items()}
        return join_outputs({key: (index, f.result()) for key, (index, f) in futures.items()}, rows)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in {id(c): c for c in self.clients.values()}.values():
            c.close()
