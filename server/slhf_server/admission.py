"""Admission control: a bound on in-flight work, counted in generations.

A request weighs ``choices x (rounds + 1)`` generations (the first answer and each Follower round
of each choice). It is admitted when the admitted weight plus its own stays within
``SLHF_MAX_INFLIGHT_GENERATIONS``, else refused at once with a 429 and a Retry-After estimate;
there is no queue, so admitted requests run concurrently and batch in the engine. A request
heavier than the whole bound counts as the bound (it runs alone). While the server drains for
shutdown every request is refused with a 503.

The event loop is single-threaded, so the counters need no lock. With several API processes
(``SLHF_API_SERVERS``) the bound is shared: every process reserves its requests' weight in one
counter in shared memory (``SharedWeight``, a ``multiprocessing`` value with its own lock), so
the processes together admit at most the bound, whichever process a connection lands on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from slhf_server.errors import OverloadedError, ServiceUnavailableError
from slhf_server.metrics import ServiceMetrics

ABORT_WAIT_S = 2.0
"""After the drain's grace: how long the aborted requests get to answer their 503."""


class SharedWeight(Protocol):
    """The admitted weight of every API process: ``multiprocessing``'s ``Value("q", 0)``."""

    value: int

    def get_lock(self) -> contextlib.AbstractContextManager[object]: ...


@dataclass(eq=False)
class Ticket:
    """One admitted request; ``release`` (idempotent) gives its weight back."""

    admission: Admission
    weight: int
    started: float = field(default_factory=time.monotonic)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    """Tasks doing this request's work, cancelled when a drain runs out of time."""
    aborted: bool = False
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self)


class Admission:
    """Admitted in-flight work against a bound; the drain flag."""

    def __init__(
        self, bound: int, metrics: ServiceMetrics, shared: SharedWeight | None = None
    ) -> None:
        self.bound = bound
        self.metrics = metrics
        self.shared = shared
        """The weight admitted by every API process, when there are several."""
        self.weight = 0
        """The weight this process admitted."""
        self.draining = False
        self.tickets: set[Ticket] = set()
        metrics.admission_limit.set(bound)
        self._mean_s = 1.0
        """Moving average of admitted requests' durations: the Retry-After estimate."""

    def acquire(self, weight: int) -> Ticket:
        if self.draining:
            self.metrics.rejections.labels("draining").inc()
            raise ServiceUnavailableError(
                "the server is shutting down and admits no new requests; retry on another instance",
                code="draining",
            )
        w = min(max(weight, 1), self.bound)
        in_flight = self._reserve(w)
        if in_flight is not None:
            self.metrics.rejections.labels("overloaded").inc()
            raise OverloadedError(
                f"the server is at capacity: {in_flight} of {self.bound} generations in "
                f"flight (SLHF_MAX_INFLIGHT_GENERATIONS) and this request needs {weight}; "
                f"retry after {self.retry_after_s()} s",
                retry_after_s=self.retry_after_s(),
            )
        ticket = Ticket(self, w)
        self.weight += w
        self.tickets.add(ticket)
        self._publish()
        return ticket

    def _reserve(self, w: int) -> int | None:
        """Reserve ``w`` of the bound: None when it fits, else the weight in flight."""
        if self.shared is None:
            return self.weight if self.weight + w > self.bound else None
        with self.shared.get_lock():
            total = self.shared.value
            if total + w > self.bound:
                return total
            self.shared.value = total + w
        return None

    def release(self, ticket: Ticket) -> None:
        self.tickets.discard(ticket)
        self.weight -= ticket.weight
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared.value -= ticket.weight
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - ticket.started)
        self._publish()

    def retry_after_s(self) -> int:
        """Seconds until capacity is likely free: about one request's duration, 1..30."""
        return min(30, max(1, math.ceil(self._mean_s)))

    def _publish(self) -> None:
        self.metrics.admitted_weight.set(self.weight)
        self.metrics.admitted_requests.set(len(self.tickets))

    # -- drain --------------------------------------------------------------------------------
    async def drain(self, grace_s: float) -> int:
        """Refuse new requests; wait up to ``grace_s`` for the admitted ones, then abort the
        rest. Returns how many were aborted."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + grace_s
        while self.tickets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self.tickets)
        for ticket in leftover:
            ticket.aborted = True
            for task in ticket.tasks:
                task.cancel()
        for _ in range(int(ABORT_WAIT_S / 0.05)):  # let the cancelled requests answer
            if not self.tickets:
                break
            await asyncio.sleep(0.05)
        return len(leftover)
