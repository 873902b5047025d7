"""The Python client: ``predict``, ``submit`` and ``map`` against deployed APIs.

The gateway is built on it too, so every request, whichever way it arrives, takes the same
path: check the API and its queue, put the task on the API's queue with ``reply_to`` set to
this client's reply list, and wait for the replica to push the reply there.

Replies are collected by ONE listener thread per client that hands each reply to its waiter
(a :class:`concurrent.futures.Future`). Celery's own ``AsyncResult.get()`` is not used: the
Redis result backend's consumer is not safe to share between threads (celery #4480, #6350),
and a connection per waiting request does not scale to hundreds of them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import redis
from kombu.exceptions import OperationalError

from inferq import stack
from inferq.errors import (
    BrokerUnavailable,
    PredictionError,
    PredictionTimeout,
    QueueFull,
    UnknownAPI,
    some_of,
)
from inferq.registry import DeployedApi, Registry
from inferq.samples import check_sample
from inferq.workers.app import TASK_NAME, make_app, queue_name

log = logging.getLogger("inferq.client")

BROKER_ERRORS = (redis.RedisError, OperationalError, ConnectionError, OSError)


class _Replies:
    """One thread that collects this client's replies and completes the waiting futures."""

    def __init__(self, registry: Registry, key: str) -> None:
        self._registry = registry
        self._key = key
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[Future, str, int | None]] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (monotonic deadline, task id)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-replies", daemon=True)
        self._thread.start()

    def expect(self, task_id: str, api: str, index: int | None, timeout: float) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._waiting[task_id] = (future, api, index)
            heapq.heappush(self._deadlines, (time.monotonic() + timeout, task_id))
        future.timeout = timeout  # type: ignore[attr-defined]  (for the 504 message)
        return future

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._waiting.pop(task_id, None)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                replies = self._registry.pop_replies(self._key, timeout=self._wait_time())
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                if failures == 1:
                    log.warning("reply listener: broker unreachable (%s); retrying", exc)
                self._stopped.wait(min(0.1 * 2**failures, 2.0))
                replies = []
            for reply in replies:
                self._complete(reply)
            self._expire()

    def _wait_time(self) -> float:
        with self._lock:
            if not self._deadlines:
                return 1.0
            until = self._deadlines[0][0] - time.monotonic()
        # BLPOP takes whole or fractional seconds; 0 would mean "forever"
        return min(1.0, max(until, 0.01))

    def _complete(self, reply: dict[str, Any]) -> None:
        with self._lock:
            waiter = self._waiting.pop(reply.get("id", ""), None)
        if waiter is None:
            return  # timed out already, or a duplicate: nobody waits for it
        future, api, index = waiter
        if "error" in reply:
            future.set_exception(PredictionError(reply["error"], api=api, index=index))
        else:
            future.set_result(reply.get("result"))

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, task_id = heapq.heappop(self._deadlines)
                waiter = self._waiting.pop(task_id, None)
                if waiter is not None:
                    expired.append(waiter)
        for future, api, index in expired:
            future.set_exception(
                PredictionTimeout(
                    f"no replica answered within {future.timeout:g}s (the request was "
                    "withdrawn and will not run later)",
                    api=api,
                    index=index,
                )
            )


class Client:
    """Send samples to deployed APIs.

    Parameters
    ----------
    broker_url:
        The broker (Redis) URL; default ``INFERQ_BROKER_URL`` or the running embedded stack.
    max_connections:
        Redis connections this client opens at most (one per thread talking to Redis).
    """

    def __init__(self, broker_url: str | None = None, *, max_connections: int = 256) -> None:
        self.broker_url = broker_url or stack.broker_url()
        # Threads beyond max_connections that talk to Redis at once wait for a connection.
        self.registry = Registry(self.broker_url, max_connections=max_connections)
        self.app = make_app(self.broker_url)
        self.id = uuid.uuid4().hex
        self._apis: dict[str, DeployedApi] = {}
        self._changes = -1
        self._apis_lock = threading.Lock()
        self._replies = _Replies(self.registry, Registry.reply_key(self.id))

    # -- public API ---------------------------------------------------------------------------

    def predict(self, api: str, sample: Any, *, debug: bool = False,
                timeout: float | None = None) -> Any:
        """Predict one sample and return the prediction; raise :class:`PredictionError`."""
        return self.submit(api, sample, debug=debug, timeout=timeout).result()

    def submit(self, api: str, sample: Any, *, debug: bool = False, timeout: float | None = None,
               index: int | None = None) -> Future:
        """Queue one sample; return a future whose ``result(timeout)`` is the prediction.

        The future fails with :class:`PredictionTimeout` when no replica answers within the
        API's ``compute.timeout`` (or ``timeout``); the request is then withdrawn: a replica
        that takes it later drops it. Raises :class:`UnknownAPI`, :class:`QueueFull` or
        :class:`BrokerUnavailable` before anything is queued, and :class:`InvalidSample` for a
        sample that is not JSON-serialisable, nests deeper than 100 levels or is over 256 MiB.
        """
        check_sample(sample, api=api, index=index)  # InvalidSample, before anything is queued
        deployed = self._admit(api)
        timeout = deployed.api.compute.timeout if timeout is None else timeout
        task_id = uuid.uuid4().hex
        # The message expires before the caller stops waiting, so no replica can start it
        # after the caller was told it timed out.
        expires = datetime.now(UTC) + timedelta(seconds=timeout)
        future = self._replies.expect(task_id, api, index, timeout)
        try:
            self.app.send_task(
                TASK_NAME,
                args=[sample],
                kwargs={"debug": bool(debug)},
                queue=queue_name(api),
                task_id=task_id,
                reply_to=Registry.reply_key(self.id),
                ignore_result=True,
                expires=expires,
                retry=False,
            )
        except BROKER_ERRORS as exc:
            self._replies.forget(task_id)
            raise BrokerUnavailable(f"cannot queue the request: the broker is unreachable ({exc})")
        future.task_id = task_id  # type: ignore[attr-defined]
        return future

    def cancel(self, future: Future) -> None:
        """Withdraw a submitted request that is no longer wanted (its caller went away)."""
        task_id = getattr(future, "task_id", None)
        if task_id is None or future.done():
            return
        self._replies.forget(task_id)
        try:
            self.app.control.revoke(task_id)
        except BROKER_ERRORS:
            pass  # the message expires on its own

    def map(self, api: str, samples: Iterable[Any], *, progress: bool = False,
            window: int = 64, timeout: float | None = None) -> Iterator[Any]:
        """Predict every sample; yield the predictions in input order.

        At most ``window`` requests are in flight at any time and results are yielded as soon
        as they are next in order, so a million samples never mean a million queued messages
        or results held at once. ``samples`` may be a generator. The first failed sample
        raises :class:`PredictionError` naming the API, the sample's index and the message.
        """
        self._admit(api)  # an unknown API fails before anything is queued
        total = len(samples) if hasattr(samples, "__len__") else None
        bar = _progress_bar(api, total) if progress else None
        return self._map(api, iter(samples), bar, max(1, window), timeout)

    def close(self) -> None:
        self._replies.close()
        self.registry.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _map(self, api: str, samples: Iterator[Any], bar: Any, window: int,
             timeout: float | None) -> Iterator[Any]:
        in_flight: deque[Future] = deque()
        counter = itertools.count()
        try:
            for index, sample in zip(counter, samples):
                in_flight.append(self._submit_waiting(api, sample, index, timeout))
                if len(in_flight) >= window:
                    yield self._next_in_order(in_flight, bar)
            while in_flight:
                yield self._next_in_order(in_flight, bar)
        finally:
            for future in in_flight:
                self.cancel(future)
            if bar is not None:
                bar.close()

    def _submit_waiting(self, api: str, sample: Any, index: int, timeout: float | None) -> Future:
        """Submit, waiting (not failing) while the API's queue is full."""
        delay = 0.05
        while True:
            try:
                return self.submit(api, sample, index=index, timeout=timeout)
            except QueueFull:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    def _next_in_order(in_flight: deque[Future], bar: Any) -> Any:
        result = in_flight[0].result()  # raises PredictionError with the sample's index
        in_flight.popleft()
        if bar is not None:
            bar.update(1)
        return result

    def _admit(self, api: str) -> DeployedApi:
        """The deployed API, if it exists and its queue has room (one round trip)."""
        try:
            changes, depth = self.registry.changes_and_queue_length(queue_name(api))
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker is unreachable ({exc})") from None
        deployed = self._lookup(api, changes)
        limit = deployed.api.compute.max_queue_length
        if depth >= limit:
            raise QueueFull(
                f'api "{api}": its queue holds {depth} requests, the limit is {limit} '
                "(compute.max_queue_length); retry later",
                retry_after=1,
            )
        return deployed

    def _lookup(self, api: str, changes: int) -> DeployedApi:
        apis = self._known_apis(changes)
        deployed = apis.get(api)
        if deployed is None:
            known = some_of(sorted(apis))
            raise UnknownAPI(f'no API named "{api}" is deployed (deployed: {known})')
        return deployed

    def _known_apis(self, changes: int) -> dict[str, DeployedApi]:
        """The deployed APIs by name, re-read only when ``changes`` says something changed."""
        with self._apis_lock:
            if changes != self._changes:
                self._apis = {a.name: a for a in self.registry.apis()}
                self._changes = changes
            return self._apis

    def apis(self) -> list[DeployedApi]:
        """The deployed APIs (refreshed when anything was deployed or deleted)."""
        try:
            changes, _ = self.registry.changes_and_queue_length(None)
            return list(self._known_apis(changes).values())
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker is unreachable ({exc})") from None


def _progress_bar(api: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=api, unit="sample")
