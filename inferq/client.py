"""The Python client: ``predict``, ``submit`` and ``map`` against deployed APIs.

The gateway is built on it too, so every request, whichever way it arrives, takes the same
path, one Redis round trip out: a script checks that the API list this client knows is
current (the registry's change counter) and that the queue has room, and pushes the task
message (``inferq.messages``) with ``reply_to`` set to this client's reply list; the
replica pushes the reply there.

Replies to submitted requests are collected by one listener thread per client
(:mod:`inferq.futures`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future
from typing import Any, Self

import redis

from inferq import keys, messages, stack
from inferq.errors import (
    ApiUnavailable,
    BrokerUnavailable,
    InvalidSample,
    PredictionError,
    PredictionTimeout,
    QueueFull,
    RequestWithdrawn,
    UnknownAPI,
    UnknownRequest,
    some_of,
)
from inferq.futures import BatchFuture, ReplyListener, RequestFuture, Waiter, withdraw
from inferq.jobs import Job, Jobs
from inferq.registry import Admission, DeployedApi, Registry, Serving
from inferq.samples import batch_fits, check_sample

log = logging.getLogger("inferq.client")

POLL_SECONDS = 0.5  # how often a waiting predict() asks whether its caller still wants it
SERVING_CHECK_SECONDS = 0.5  # how long what the registry says of an API's replicas is trusted


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
        self.id = uuid.uuid4().hex
        self.reply_key = keys.reply(self.id)
        self._apis: dict[str, DeployedApi] = {}
        self._changes = -1
        self._apis_lock = threading.Lock()
        self._serving: dict[str, tuple[float, Serving]] = {}  # API -> (when read, serving)
        self._replies = ReplyListener(self.registry, self.reply_key)

    # -- public API ---------------------------------------------------------------------------

    def predict(self, api: str, sample: Any, *, debug: bool = False,
                timeout: float | None = None, endpoint: str | None = None,
                still_wanted: Callable[[], bool] | None = None, checked: bool = False) -> Any:
        """Predict one sample and return the prediction; raise :class:`PredictionError`
        (:class:`PredictionTimeout` after the API's ``compute.timeout``, or ``timeout``).

        The calling thread waits on a reply list of this request's own: queueing and the
        first wait for the reply are one Redis round trip, and no other thread is involved.
        ``still_wanted`` (the gateway: is the HTTP client still there?) is asked every half
        second; when it says no, the request is withdrawn and :class:`RequestWithdrawn` raised.
        With ``endpoint`` (the gateway), :class:`UnknownAPI` also when the API moved.
        :class:`InvalidSample` for a sample that is not JSON-serialisable, nests deeper than
        100 levels or is over 256 MiB (``checked``: the caller checked it already).
        :class:`ApiUnavailable` at once, nothing queued, when no replica is live and none is
        coming (see :meth:`check_serving`).
        """
        deployed = self._deployed(api)
        self.check_serving(deployed)
        timeout = deployed.api.compute.timeout if timeout is None else timeout
        task_id = uuid.uuid4().hex
        reply_to = keys.reply(f"{self.id}:{task_id}")
        queue = keys.queue(api)
        message = self._encode(api, task_id, sample, queue, reply_to, timeout, debug, None,
                               checked)
        deadline = time.monotonic() + timeout
        reply = self._call(deployed, queue, message, task_id, reply_to, endpoint, deadline,
                           timeout)
        return self.await_reply(api, reply_to, deadline, timeout, reply=reply,
                                still_wanted=still_wanted,
                                withdraw=lambda: withdraw(self.registry, queue, message))

    def check_serving(self, deployed: DeployedApi) -> None:
        """Raise :class:`ApiUnavailable` when ``deployed`` cannot serve a request now: no
        replica is live and its status is an error of its version or ``compute
        unavailable``, or no scaler runs to start a replica. An API starting or scaling from
        zero passes (a request waits for it). What the registry says is read at most every
        :data:`SERVING_CHECK_SECONDS` per API, so this costs no round trip per request."""
        now = time.monotonic()
        known = self._serving.get(deployed.name)
        if known is None or now - known[0] >= SERVING_CHECK_SECONDS:
            try:
                known = (now, self.registry.replicas.serving(deployed.name))
            except redis.RedisError:
                return  # queueing says the broker is away
            self._serving[deployed.name] = known
        unavailable = known[1].unavailable(deployed.version)
        if unavailable is not None:
            status, reason = unavailable
            said = f"its status is {status}: " if status else ""
            raise ApiUnavailable(f'api "{deployed.name}" cannot serve now: {said}{reason}',
                                 api=deployed.name, status=status, reason=reason)

    def await_reply(self, api: str, reply_to: str, deadline: float, timeout: float, *,
                    reply: dict[str, Any] | None = None,
                    still_wanted: Callable[[], bool] | None = None,
                    withdraw: Callable[[], None] | None = None) -> Any:
        """The prediction pushed to ``reply_to`` (a list of one request's own) by the
        ``deadline`` (monotonic), asking ``still_wanted`` every half second; on giving up,
        ``withdraw`` and raise :class:`PredictionTimeout` or :class:`RequestWithdrawn`."""
        while reply is None:
            remaining = deadline - time.monotonic()
            wanted = still_wanted is None or still_wanted()
            if remaining <= 0 or not wanted:
                if withdraw is not None:
                    withdraw()
                if not wanted:
                    raise RequestWithdrawn(f'api "{api}": the caller went away; the request was '
                                           "withdrawn")
                raise PredictionTimeout(
                    f"no replica answered within {timeout:g}s (the request was withdrawn and "
                    "will not run later)", api=api)
            reply = self._wait_reply(reply_to, min(remaining, POLL_SECONDS))
        if "error" in reply:
            raise PredictionError(reply["error"], api=api)
        return reply.get("result")

    def submit(self, api: str, sample: Any, *, debug: bool = False, timeout: float | None = None,
               index: int | None = None, endpoint: str | None = None) -> RequestFuture:
        """Queue one sample; return a future whose ``result(timeout)`` is the prediction.

        The future fails with :class:`PredictionTimeout` when no replica answers within the
        API's ``compute.timeout`` (or ``timeout``); the request is then withdrawn: a replica
        that takes it later drops it. Raises :class:`UnknownAPI`, :class:`QueueFull` or
        :class:`BrokerUnavailable` before anything is queued, and :class:`InvalidSample` for a
        sample that is not JSON-serialisable, nests deeper than 100 levels or is over 256 MiB.
        With ``endpoint`` (the gateway), :class:`UnknownAPI` also when the API no longer serves
        that endpoint.
        """
        deployed = self._deployed(api)
        timeout = deployed.api.compute.timeout if timeout is None else timeout
        task_id = uuid.uuid4().hex
        queue = keys.queue(api)
        message = self._encode(api, task_id, sample, queue, self.reply_key, timeout, debug, index)
        waiter = Waiter(RequestFuture(), api, index, queue, message)
        self._replies.expect(task_id, waiter, timeout)
        try:
            self._enqueue(deployed, queue, message, endpoint)
        except BaseException:
            self._replies.forget(task_id)
            raise
        waiter.future.task_id = task_id
        return waiter.future

    def enqueue(self, api: str, sample: Any, *, endpoint: str | None = None,
                checked: bool = False) -> str:
        """Queue ``sample`` as an async request and return its id at once.

        The request waits in the API's queue like any other (for as long as the API's
        ``compute.async_retention`` allows, not its ``timeout``); its state and answer are
        kept in Redis for that long, so :meth:`status` finds them from any client or gateway.
        Raises :class:`UnknownAPI`, :class:`QueueFull`, :class:`BrokerUnavailable` or
        :class:`InvalidSample` before anything is queued.
        """
        deployed = self._deployed(api)
        if not checked:
            check_sample(sample, api=api)
        retention = deployed.api.compute.async_retention
        request_id = uuid.uuid4().hex
        queue = keys.queue(api)
        state = keys.async_state(api, request_id)
        try:
            message = messages.encode_async(request_id, sample, queue=queue, state=state,
                                            expires_at=time.time() + retention)
        except (TypeError, ValueError) as exc:  # NaN or Infinity (JSON has neither)
            raise InvalidSample(f"the sample cannot be sent as JSON: {exc}", api=api) from None

        def send(changes: int, limit: int) -> tuple[Admission, int, None]:
            try:
                outcome, value = self.registry.queues.enqueue_async(
                    queue, message, state, retention, changes=changes, limit=limit)
            except redis.RedisError as exc:
                raise BrokerUnavailable(
                    f"cannot queue the request: the broker is unreachable ({exc})") from None
            return outcome, value, None

        self._admitted(deployed, endpoint, send)
        return request_id

    def status(self, api: str, request_id: str) -> dict[str, Any]:
        """An async request's ``{"id", "status"}`` — ``in_queue``, ``in_progress``,
        ``completed`` (with ``"result"``) or ``failed`` (with ``"error"``). Raises
        :class:`UnknownRequest` for an id that is unknown or past its retention."""
        try:
            state = self.registry.queues.async_state(api, request_id)
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker is unreachable ({exc})") from None
        if state is None:
            raise UnknownRequest(f'api "{api}": no async request {request_id!r} (unknown, or '
                                 "past the API's async_retention)")
        return state.to_dict()

    def cancel(self, future: Future) -> None:
        """Withdraw a submitted request that is no longer wanted (its caller went away)."""
        task_id = getattr(future, "task_id", None)
        if task_id is None or future.done():
            return
        waiter = self._replies.forget(task_id)
        if waiter is not None:
            withdraw(self.registry, waiter.queue, waiter.message)

    def submit_batch(self, api: str, samples: list[Any], *, first_index: int = 0,
                     debug: bool = False, timeout: float | None = None) -> list[RequestFuture]:
        """Queue ``samples`` as ONE message; return one future per sample, in order.

        The replica predicts them together (``predict_batch`` when the predictor defines it)
        and answers each on its own: a failed sample's future raises :class:`PredictionError`
        naming its index (``first_index`` + its position), the others get their predictions.
        """
        return self._send_batch(api, samples, first_index, debug, timeout, whole=False)

    def _send_batch(self, api: str, samples: list[Any], first_index: int, debug: bool,
                    timeout: float | None, *, whole: bool) -> list[RequestFuture]:
        """Queue ``samples`` as one message: a future per sample, or (``whole``) one
        :class:`BatchFuture` for them all (``map``, which needs no more: a future costs
        about as much as a cheap model's prediction)."""
        deployed = self._deployed(api)
        timeout = deployed.api.compute.timeout if timeout is None else timeout
        expires_at = time.time() + timeout
        batch_id = uuid.uuid4().hex
        ids = [f"{batch_id}.{position}" for position in range(len(samples))]
        message = self._encode_batch(api, samples, [(self.reply_key, i, expires_at) for i in ids],
                                     debug, first_index)
        queue = keys.queue(api)
        waiting = {batch_id: Waiter(BatchFuture(), api, first_index, queue, message)} if whole \
            else {request_id: Waiter(RequestFuture(), api, first_index + position, queue, message)
                  for position, request_id in enumerate(ids)}
        for key, waiter in waiting.items():
            self._replies.expect(key, waiter, timeout)
        try:
            self._enqueue(deployed, queue, message, None, extra=len(samples) - 1)
        except BaseException:
            for key in waiting:
                self._replies.forget(key)
            raise
        for key, waiter in waiting.items():
            waiter.future.task_id = key
        return [waiter.future for waiter in waiting.values()]

    def queue_batch(self, api: str, samples: list[Any], replies: list[tuple[str, str, float]],
                    *, debug: bool = False) -> None:
        """Queue ``samples`` as one message, each answered on its own ``(reply list, request
        id, expires at)`` (the gateway's dynamic batching; the samples are checked already).
        Raises :class:`UnknownAPI`, :class:`QueueFull` or :class:`BrokerUnavailable`."""
        deployed = self._deployed(api)
        message = self._encode_batch(api, samples, replies, debug, 0)
        self._enqueue(deployed, keys.queue(api), message, None, extra=len(samples) - 1)

    @staticmethod
    def _encode_batch(api: str, samples: list[Any], replies: list[tuple[str, str, float]],
                      debug: bool, first_index: int) -> str:
        """The batch message; :class:`InvalidSample` naming the first sample that cannot
        travel (the samples are checked together, and one by one only when that fails)."""
        if not batch_fits(samples):
            for position, sample in enumerate(samples):
                check_sample(sample, api=api, index=first_index + position)
        try:
            return messages.encode_batch(uuid.uuid4().hex, list(samples), replies,
                                         queue=keys.queue(api), debug=bool(debug))
        except (TypeError, ValueError) as exc:  # NaN or Infinity (JSON has neither)
            raise InvalidSample(f"a sample cannot be sent as JSON: {exc}", api=api,
                                index=first_index) from None

    def map(self, api: str, samples: Iterable[Any], *, progress: bool = False,
            batch_size: int = 64, window: int = 512,
            timeout: float | None = None) -> Iterator[Any]:
        """Predict every sample; yield the predictions in input order.

        Samples travel ``batch_size`` to a message (1: one message each), and at most
        ``window`` samples are in flight at any time (at least one batch); results are yielded
        as soon as they are next in order, so a million samples never mean a million queued
        messages or results held at once. ``samples`` may be a generator. The first failed
        sample raises :class:`PredictionError` naming the API, the sample's index and the
        message.
        """
        self._deployed(api)  # an unknown API fails before anything is queued
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be at least 1, got {batch_size}, "
                             f"{window}")
        total = len(samples) if isinstance(samples, Sized) else None
        bar = _progress_bar(api, total) if progress else None
        return self._map(api, iter(samples), bar, batch_size, max(window, batch_size), timeout)

    def batch(self, api: str, input: str | os.PathLike, output: str | os.PathLike | None = None,
              *, batch_size: int = 64,
              window: int = 512) -> Job:
        """Submit a batch job: every sample of ``input`` predicted through ``api``'s queue.

        ``input``: a JSON Lines file, a folder of ``.jsonl`` files, or an ``s3://`` object or
        prefix of them. ``output`` (default beside the input, ``<input>.predictions.jsonl``):
        a local path or ``s3://`` object that gets one line per sample in input order,
        ``{"index": i, "result": ...}`` or ``{"index": i, "error": ...}``; failed samples also
        go to ``<output>.failed.jsonl`` with the sample. Samples travel up to ``batch_size`` to
        a message (fewer for a model slow per sample, so live requests never wait long behind
        a job's message), at most ``window`` at a time. The job runs on the stack (any host's scaler
        drives it), not in this process: it goes on when this process ends. Raises
        :class:`UnknownAPI`, or :class:`JobError` for an input or output it cannot use.
        """
        self._deployed(api)
        if batch_size < 1 or window < batch_size:
            raise ValueError(f"batch_size must be at least 1 and window at least batch_size, "
                             f"got {batch_size}, {window}")
        job_id = self.jobs.submit(api, input, output, batch_size=batch_size, window=window)
        return Job(self.jobs, job_id)

    def job(self, job_id: str) -> Job:
        """The batch job ``job_id``; :class:`JobError` when there is none."""
        self.jobs.require(job_id)
        return Job(self.jobs, job_id)

    @functools.cached_property
    def jobs(self) -> Jobs:
        """The batch jobs' records (:class:`inferq.jobs.Jobs`), on this client's connection."""
        return Jobs(self.registry)

    def close(self) -> None:
        self._replies.close()
        self.registry.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _map(self, api: str, samples: Iterator[Any], bar: Any, batch_size: int, window: int,
             timeout: float | None) -> Iterator[Any]:
        in_flight: deque[tuple[RequestFuture, int, int]] = deque()  # (future, first, samples)
        sent = 0
        try:
            while True:
                batch = list(itertools.islice(samples, batch_size))
                if not batch:
                    break
                while in_flight and sum(n for *_, n in in_flight) + len(batch) > window:
                    yield from self._next_in_order(api, in_flight, bar)
                in_flight.append((self._submit_waiting(api, batch, sent, timeout), sent,
                                  len(batch)))
                sent += len(batch)
            while in_flight:
                yield from self._next_in_order(api, in_flight, bar)
        finally:
            for future, _, _ in in_flight:
                self.cancel(future)
            if bar is not None:
                bar.close()

    def _submit_waiting(self, api: str, batch: list[Any], first_index: int,
                        timeout: float | None) -> RequestFuture:
        """Submit, waiting (not failing) while the API's queue is full."""
        delay = 0.05
        while True:
            try:
                if len(batch) == 1:
                    return self.submit(api, batch[0], index=first_index, timeout=timeout)
                return self._send_batch(api, batch, first_index, False, timeout, whole=True)[0]
            except QueueFull:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    def _next_in_order(api: str, in_flight: deque[tuple[RequestFuture, int, int]],
                       bar: Any) -> Iterator[Any]:
        """The predictions of the oldest message in flight, in order; PredictionError (or
        PredictionTimeout) naming the index of the first sample that has none."""
        future, first, count = in_flight[0]
        value = future.result()  # a single sample's error or timeout raises here
        in_flight.popleft()
        if not isinstance(future, BatchFuture):  # a message of one sample: its prediction
            if bar is not None:
                bar.update(1)
            yield value
            return
        by_position = {int(answer["id"].rpartition(".")[2]): answer for answer in value}
        for position in range(count):
            answer = by_position.get(position)
            if answer is None:  # skipped by the replica: its deadline had passed
                raise PredictionTimeout("no replica answered it in time", api=api,
                                        index=first + position)
            if "error" in answer:
                raise PredictionError(answer["error"], api=api, index=first + position)
            if bar is not None:
                bar.update(1)
            yield answer.get("result")

    @staticmethod
    def _encode(api: str, task_id: str, sample: Any, queue: str, reply_to: str, timeout: float,
                debug: bool, index: int | None, checked: bool = False) -> str:
        if not checked:
            check_sample(sample, api=api, index=index)  # InvalidSample, before anything is queued
        try:
            # The message expires with the caller's deadline, so no replica can start it
            # after the caller was told it timed out.
            return messages.encode(task_id, sample, queue=queue, reply_to=reply_to,
                                   expires_at=time.time() + timeout, debug=bool(debug))
        except (TypeError, ValueError) as exc:  # NaN or Infinity (JSON has neither)
            raise InvalidSample(f"the sample cannot be sent as JSON: {exc}", api=api,
                                index=index) from None

    def _call(self, deployed: DeployedApi, queue: str, message: str, request_id: str,
              reply_to: str, endpoint: str | None, deadline: float,
              timeout: float) -> dict[str, Any] | None:
        """Queue ``message`` and wait a first moment for its reply, in one round trip."""
        def send(changes: int, limit: int) -> tuple[Admission, int, dict[str, Any] | None]:
            sent = False  # the broker may have queued it: from then on, resend, never give up
            while True:
                wait = max(0.01, min(deadline - time.monotonic(), POLL_SECONDS))
                try:
                    return self.registry.queues.call(queue, message, request_id, reply_to, wait,
                                              changes=changes, limit=limit, ttl=timeout)
                except redis.ConnectionError as exc:
                    if not sent and "connecting" in str(exc):  # nothing was sent
                        raise BrokerUnavailable(f"cannot queue the request: the broker is "
                                                f"unreachable ({exc})") from None
                    if not sent:
                        log.warning("the broker connection broke while queueing (%s); sending "
                                    "the request again when it answers (it is queued once)",
                                    exc)
                    sent = True
                    if time.monotonic() >= deadline:
                        return Admission.QUEUED, 0, None  # the wait for its reply times out
                    time.sleep(0.1)
                except redis.RedisError as exc:
                    raise BrokerUnavailable(
                        f"cannot queue the request: the broker is unreachable ({exc})") from None

        return self._admitted(deployed, endpoint, send)

    def _wait_reply(self, reply_to: str, wait: float) -> dict[str, Any] | None:
        try:
            return self.registry.queues.wait_reply(reply_to, wait)
        except redis.RedisError:
            time.sleep(min(wait, 0.2))  # the broker is away: the reply waits in its list
            return None

    def _deployed(self, api: str) -> DeployedApi:
        """The API as this client knows it (checked against the registry when queueing)."""
        deployed = self._apis.get(api)
        if deployed is None:
            deployed = self._lookup(api, self._refresh())
        return deployed

    def _enqueue(self, deployed: DeployedApi, queue: str, message: str,
                 endpoint: str | None, *, extra: int = 0) -> None:
        """Queue ``message`` in one round trip, unless the API is gone or its queue full."""
        def send(changes: int, limit: int) -> tuple[Admission, int, None]:
            try:
                outcome, value = self.registry.queues.enqueue(queue, message, changes=changes,
                                                       limit=limit, extra=extra)
            except redis.RedisError as exc:
                raise BrokerUnavailable(
                    f"cannot queue the request: the broker is unreachable ({exc})") from None
            return outcome, value, None

        self._admitted(deployed, endpoint, send)

    def _admitted(self, deployed: DeployedApi, endpoint: str | None, send: Callable) -> Any:
        """``send(changes, limit)`` until the registry admits it; what it returned last.

        "stale": something was deployed or deleted since this client read the APIs: read them
        again and decide again (UnknownAPI when the API is gone, or moved off ``endpoint``).
        """
        for _ in range(3):
            limit = deployed.api.compute.max_queue_length
            outcome, value, reply = send(self._changes, limit)
            if outcome == Admission.QUEUED:
                return reply
            if outcome == Admission.FULL:
                raise QueueFull(
                    f'api "{deployed.name}": its queue holds {value} requests, the limit is '
                    f"{limit} (compute.max_queue_length); retry later",
                    retry_after=1,
                )
            deployed = self._lookup(deployed.name, self._refresh())  # UnknownAPI if deleted
            if endpoint is not None and deployed.api.endpoint != endpoint:
                raise UnknownAPI(f'api "{deployed.name}" moved from {endpoint} to '
                                 f"{deployed.api.endpoint}")
        raise BrokerUnavailable("the deployed APIs keep changing; retry")

    def _lookup(self, api: str, apis: dict[str, DeployedApi]) -> DeployedApi:
        deployed = apis.get(api)
        if deployed is None:
            known = some_of(sorted(apis))
            raise UnknownAPI(f'no API named "{api}" is deployed (deployed: {known})')
        return deployed

    def _refresh(self) -> dict[str, DeployedApi]:
        """Re-read the deployed APIs if anything was deployed or deleted since the last read."""
        try:
            changes = self.registry.deployments.changes()
            with self._apis_lock:
                if changes != self._changes:
                    self._apis = {a.name: a for a in self.registry.deployments.apis()}
                    self._changes = changes
                return self._apis
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"the broker is unreachable ({exc})") from None

    def apis(self) -> list[DeployedApi]:
        """The deployed APIs (refreshed when anything was deployed or deleted)."""
        return list(self._refresh().values())

    def cached_apis(self) -> dict[str, DeployedApi]:
        """The deployed APIs as last read, without a round trip (queueing checks they are
        current)."""
        return self._apis


def _progress_bar(api: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=api, unit="sample")
