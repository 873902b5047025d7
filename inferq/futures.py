"""Futures of submitted requests, and the one thread per client that completes them.

Replies are collected by ONE listener thread per client that hands each reply to its waiter
(a :class:`RequestFuture`). Celery's own ``AsyncResult.get()`` is not used: the Redis result
backend's consumer is not safe to share between threads (celery #4480, #6350), and a
connection per waiting request does not scale to hundreds of them.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis

from inferq.errors import PredictionError, PredictionTimeout
from inferq.registry import Registry

log = logging.getLogger("inferq.client")


class RequestFuture(Future):
    """The future of a submitted request: its result is the prediction; ``task_id`` is the
    request's id (as ``celery inspect active`` shows it)."""

    task_id: str = ""


class BatchFuture(RequestFuture):
    """The future of a whole batch message (``Client.map``): its result is the answers of the
    samples the replica predicted, ``{"id": "<batch>.<position>", "result" | "error"}`` each,
    in one reply; one future per message, not per sample."""


@dataclass
class Waiter:
    future: RequestFuture
    api: str
    index: int | None
    queue: str
    message: str
    timeout: float = 0.0  # seconds it waits at most (for the 504 message)


class ReplyListener:
    """One thread that collects this client's replies and completes the waiting futures."""

    def __init__(self, registry: Registry, key: str) -> None:
        self._registry = registry
        self._key = key
        self._lock = threading.Lock()
        self._waiting: dict[str, Waiter] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (monotonic deadline, task id)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-replies", daemon=True)
        self._thread.start()

    def expect(self, task_id: str, waiter: Waiter, timeout: float) -> None:
        waiter.future.set_running_or_notify_cancel()
        waiter.timeout = timeout
        with self._lock:
            self._waiting[task_id] = waiter
            heapq.heappush(self._deadlines, (time.monotonic() + timeout, task_id))

    def forget(self, task_id: str) -> Waiter | None:
        with self._lock:
            return self._waiting.pop(task_id, None)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                replies = self._registry.queues.pop_replies(self._key, timeout=self._wait_time())
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                if failures == 1:
                    log.warning("reply listener: broker unreachable (%s); retrying", exc)
                self._stopped.wait(min(0.1 * 2**failures, 2.0))
                replies = []
            for reply in replies:
                # A batch's answers come to one list in one reply (one sample's alone).
                answers = reply.get("answers", [reply])
                if not self._complete_batch(answers):
                    for answer in answers:
                        self._complete(answer)
            self._expire()

    def _wait_time(self) -> float:
        with self._lock:
            if not self._deadlines:
                return 1.0
            until = self._deadlines[0][0] - time.monotonic()
        # BLPOP takes whole or fractional seconds; 0 would mean "forever"
        return min(1.0, max(until, 0.01))

    def _complete_batch(self, answers: list[dict[str, Any]]) -> bool:
        """Hand a batch's answers to the :class:`BatchFuture` that waits for them all (False:
        none does; each answer has a waiter of its own, or none)."""
        batch_id = answers[0].get("id", "").partition(".")[0] if answers else ""
        with self._lock:
            waiter = self._waiting.get(batch_id)
            if waiter is None or not isinstance(waiter.future, BatchFuture):
                return False
            del self._waiting[batch_id]
        waiter.future.set_result(answers)
        return True

    def _complete(self, reply: dict[str, Any]) -> None:
        with self._lock:
            waiter = self._waiting.pop(reply.get("id", ""), None)
        if waiter is None:
            return  # timed out already, or a duplicate: nobody waits for it
        if "error" in reply:
            waiter.future.set_exception(
                PredictionError(reply["error"], api=waiter.api, index=waiter.index))
        else:
            waiter.future.set_result(reply.get("result"))

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, task_id = heapq.heappop(self._deadlines)
                waiter = self._waiting.pop(task_id, None)
                if waiter is not None:
                    expired.append(waiter)
        for waiter in expired:
            withdraw(self._registry, waiter.queue, waiter.message)
            waiter.future.set_exception(
                PredictionTimeout(
                    f"no replica answered within {waiter.timeout:g}s (the request was "
                    "withdrawn and will not run later)",
                    api=waiter.api,
                    index=waiter.index,
                )
            )


def withdraw(registry: Registry, queue: str, message: str) -> None:
    """Take a request nobody waits for off its queue, if no replica took it yet (one that
    did drops it: the message expires with its caller's deadline)."""
    with contextlib.suppress(redis.RedisError):  # it expires on its own
        registry.queues.withdraw(queue, message)
