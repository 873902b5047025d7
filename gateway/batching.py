"""Dynamic batching at the gateway: ``predictor.server_side_batching``.

Concurrent requests to one API that arrive within ``batch_interval`` of the first, up to
``max_batch_size`` of them, travel as ONE message and reach the predictor's
``predict_batch`` together (``predict`` per sample without it). Each caller still waits on a
reply list of its own, so it gets its own answer, its own 500 and its own 504: the message
carries one ``(reply list, request id, expires at)`` per sample, and a replica skips a sample
whose caller gave up. A batch goes out when it is full, or when its first request has waited
``batch_interval``, from one thread per API.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from inferq.client import Client
from inferq.configs import ServerSideBatching
from inferq.errors import InferqError
from inferq.registry import DeployedApi


@dataclass
class _Item:
    sample: Any
    reply: tuple[str, str, float]  # (reply list, request id, expires at)
    arrived: float  # monotonic
    queued: Future  # done when the batch is queued (or failed to be)


class Batcher:
    """Gathers one API's requests into batches and queues them (see the module doc)."""

    def __init__(self, client: Client, api: str, batching: ServerSideBatching) -> None:
        self.client = client
        self.api = api
        self.size = batching.max_batch_size
        self.interval = batching.batch_interval
        self._items: list[_Item] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"inferq-batch-{api}",
                                        daemon=True)
        self._thread.start()

    def add(self, sample: Any, reply: tuple[str, str, float]) -> Future:
        """Put a request in the next batch; the future is done once that batch is queued
        (it raises :class:`QueueFull`, :class:`UnknownAPI` or :class:`BrokerUnavailable`)."""
        item = _Item(sample, reply, time.monotonic(), Future())
        with self._changed:
            if self._closed:
                raise InferqError(f'api "{self.api}": its batcher was replaced; retry')
            self._items.append(item)
            self._changed.notify()
        return item.queued

    def close(self) -> None:
        """Send what is gathered, then stop."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._send(batch)

    def _next_batch(self) -> list[_Item] | None:
        """Wait until a batch is full or its first request waited the interval."""
        with self._changed:
            while True:
                if self._items:
                    due = self._items[0].arrived + self.interval - time.monotonic()
                    if len(self._items) >= self.size or due <= 0 or self._closed:
                        batch, self._items = self._items[: self.size], self._items[self.size:]
                        return batch
                    self._changed.wait(due)
                elif self._closed:
                    return None
                else:
                    self._changed.wait()

    def _send(self, batch: list[_Item]) -> None:
        try:
            self.client.queue_batch(self.api, [i.sample for i in batch],
                                    [i.reply for i in batch])
        except Exception as exc:
            for item in batch:
                item.queued.set_exception(exc)
            return
        for item in batch:
            item.queued.set_result(None)


class Batchers:
    """One :class:`Batcher` per API version that asks for batching, made when first needed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._batchers: dict[str, tuple[str, Batcher]] = {}
        self._lock = threading.Lock()

    def get(self, deployed: DeployedApi) -> Batcher | None:
        """The API's batcher, or None when it does not batch."""
        predictor = deployed.api.predictor
        batching = predictor.server_side_batching if predictor is not None else None
        if batching is None:
            return None
        with self._lock:
            version, batcher = self._batchers.get(deployed.name, (None, None))
            if version == deployed.version:
                return batcher
            stale = batcher
            batcher = Batcher(self.client, deployed.name, batching)
            self._batchers[deployed.name] = (deployed.version, batcher)
        if stale is not None:
            stale.close()
        return batcher

    def close(self) -> None:
        with self._lock:
            batchers, self._batchers = self._batchers, {}
        for _, batcher in batchers.values():
            batcher.close()
