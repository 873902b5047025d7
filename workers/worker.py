"""The serving process of a replica: a Celery worker, ``solo`` pool, on the API's queue.

One process does it all, so a request crosses one process, not two (a prefork pool child
doubles the hops, PITFALLS.md): the predictor is bootstrapped here before Celery's loop
starts (nothing forks afterwards, so CUDA is safe, celery #3402), and each message is served
in Celery's consumer loop, one at a time, by :func:`_strategy`: decode, predict, and answer
and acknowledge in one round trip (see ``inferq.workers.transport``). The process that
watches this one and puts back what it held when it dies is its supervisor
(``inferq.workers.supervisor``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from typing import Any

from celery import Celery, Task, signals, states
from celery.exceptions import SecurityWarning
from celery.worker import pidbox
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer, control

from inferq.errors import PredictionError, PredictorError, UnknownAPI
from inferq.registry import REPLY_TTL_SECONDS, Registry
from inferq.workers.app import make_app
from inferq.workers.messages import TASK_NAME, compact, job_answer
from inferq.workers.messages import Task as TaskMessage
from inferq.workers.messages import queue_name
from inferq.workers.replica import Replica, bootstrap
from inferq.workers.supervisor import EXIT_INIT_FAILED
from inferq.workers.transport import QUEUE_OPTION, TAKEN_KEY_OPTION

log = logging.getLogger("inferq.worker")

_replica: Replica | None = None  # the loaded predictor this process serves
_queue = ""  # its queue


def serve(api: str, broker_url: str, replica_id: str, *, loglevel: str = "INFO") -> int:
    """Bootstrap ``api``'s predictor, then serve its queue until SIGTERM (warm shutdown: the
    current request finishes). Returns the exit code."""
    global _replica, _queue
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(message)s")
    registry = Registry(broker_url, max_connections=4)
    registry.ping()
    if hasattr(os, "getuid") and os.getuid() == 0:
        # Celery's eight-line banner about root would open every replica's log; one line says it.
        warnings.filterwarnings("ignore", category=SecurityWarning)
        log.warning("running as root: prefer an unprivileged user (the Docker image uses one)")
    try:
        _replica = bootstrap(api, registry, replica_id)
    except (PredictorError, UnknownAPI) as exc:
        log.error("%s", exc)
        return EXIT_INIT_FAILED
    _queue = queue_name(api)
    app = make_app(broker_url)
    app.conf.update(
        broker_transport="inferq.workers.transport:Transport",
        worker_consumer="inferq.workers.worker:ReplicaConsumer",
        broker_transport_options={
            **app.conf.broker_transport_options,
            TAKEN_KEY_OPTION: Registry.taken_key(api, replica_id),
            QUEUE_OPTION: queue_name(api),
        },
    )
    register_task(app)
    worker = app.Worker(
        hostname=f"{api}@{replica_id}",
        queues=[queue_name(api)],
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not app.conf.worker_send_task_events,  # INFERQ_TASK_EVENTS: Flower
        optimization="fair",
        quiet=True,  # no banner: a replica's log is about its predictions
    )
    signals.after_setup_logger.connect(_quiet_celery, weak=False)
    worker.start()
    return worker.exitcode or 0


class _ThreadedPidbox(pidbox.gPidbox):
    """Remote control (``celery inspect``, ``control``) on a thread and a connection of its
    own: the solo pool's loop is busy while it predicts, and ``inspect active`` must answer
    then too (Celery does the same for its green pools)."""

    def start(self, c: Any) -> None:
        threading.Thread(target=self.loop, args=(c,), name="inferq-pidbox", daemon=True).start()


class ThreadedControl(control.Control):
    """Celery's remote-control bootstep with :class:`_ThreadedPidbox`."""

    name = "celery.worker.consumer.control.Control"  # takes the place of Celery's

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.box = _ThreadedPidbox(c)
        self.start, self.stop, self.shutdown = self.box.start, self.box.stop, self.box.shutdown


class ReplicaConsumer(Consumer):
    """Celery's consumer with :class:`ThreadedControl` in place of its remote control step,
    reconnecting to a broker that went away every second rather than kombu's 2, 4, 6 ... s
    (after a 13 s outage replicas came back 7 s after the broker)."""

    class Blueprint(Consumer.Blueprint):
        default_steps = [
            "inferq.workers.worker:ThreadedControl" if step.endswith("control:Control")
            else step for step in Consumer.Blueprint.default_steps
        ]

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=0.2, interval_step=0.2, interval_max=1.0)
        return super().ensure_connected(conn)


class PredictTask(Task):
    """``inferq.predict``, served by :func:`_strategy` (Celery's own Request, pool hand-off
    and tracing cost more than the trivial predictions this path must carry)."""

    Strategy = "inferq.workers.worker:_strategy"
    ignore_result = True
    typing = False


def register_task(app: Celery) -> None:
    """Register :data:`TASK_NAME` on ``app``."""

    @app.task(name=TASK_NAME, base=PredictTask, bind=True)
    def predict(self: Any, sample: Any, debug: bool = False) -> Any:  # called directly only
        return _replica.predict(sample, debug=bool(debug))


class _Active:
    """The message being predicted, as ``celery inspect active`` shows it (a Celery Request
    would cost more than the prediction; this is what the toolbox reads of one)."""

    def __init__(self, request: TaskMessage, message: Any, hostname: str) -> None:
        self.id = request.id
        self._info = {
            "id": request.id, "name": TASK_NAME, "type": TASK_NAME, "hostname": hostname,
            "args": [], "kwargs": {"samples": len(request.samples)},
            "time_start": time.time(), "acknowledged": False,
            "delivery_info": message.delivery_info, "worker_pid": os.getpid(),
        }

    def info(self, safe: bool = False) -> dict[str, Any]:
        return self._info


def _strategy(task: Task, app: Celery, consumer: Any, **_: Any):
    """Celery's per-task message handler for :data:`TASK_NAME` (see :class:`PredictTask`)."""
    revoked = consumer.controller.state.revoked
    backend = app.backend
    hostname = consumer.hostname
    dispatcher = consumer.event_dispatcher
    send_event = dispatcher.send if dispatcher is not None and dispatcher.enabled else None

    def serve(channel: Any, request: TaskMessage, message: Any) -> None:
        active = _Active(request, message, hostname)
        worker_state.active_requests.add(active)
        started = time.monotonic()
        if send_event is not None:
            send_event("task-received", uuid=request.id, name=TASK_NAME, args="", kwargs="",
                       retries=0, eta=None, expires=None)
            send_event("task-started", uuid=request.id)
        try:
            if request.async_state is not None:
                _serve_async(channel, request)
            elif request.job is not None:
                began = time.perf_counter()
                outcomes = _outcomes(request)
                _answer_job(channel, request, outcomes, time.perf_counter() - began)
            elif request.replies is not None:
                _answer_each(channel, request)
            elif request.batch:
                _answer(channel, backend, request, _outcomes(request))
            else:
                _answer(channel, backend, request, _predict_one(request))
        finally:
            worker_state.active_requests.discard(active)
        if send_event is not None:
            send_event("task-succeeded", uuid=request.id, result="",
                       runtime=time.monotonic() - started)

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        try:
            request = TaskMessage.from_message(message)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            log.error("dropped a message that is not an inferq.predict task: %s", exc)
            message.ack()
            return
        channel = message.channel
        if request.extra:  # the queue's sample count drops with the acknowledgement
            channel.send_with_ack("DECRBY", Registry.extra_key(_queue), request.extra)
        if request.expired or request.id in revoked:
            message.ack()  # its caller stopped waiting: it must not run later
            return
        try:
            serve(channel, request, message)
        except Exception as exc:  # noqa: BLE001  (inferq's bug: answer it, never crash-loop)
            log.exception("serving task %s failed", request.id)
            channel.take_with_ack()  # whatever half-built answer there was
            error = {"error": f"the replica failed to serve the request: {exc!r}"}
            if request.async_state is not None:
                channel.send_with_ack("HSET", request.async_state, "status", "failed",
                                      "error", error["error"])
            elif request.job is not None:
                _answer_job(channel, request, [dict(error) for _ in request.samples])
            elif request.replies is not None:
                _answer_each(channel, request, error)
            else:
                _answer(channel, backend, request, error)
        for command in _replica.take_tracking():  # statistics ride on the acknowledgement
            channel.send_with_ack(*command)
        message.ack()

    return handle


def _predict_one(request: TaskMessage) -> dict[str, Any]:
    try:
        return {"result": _replica.predict(request.samples[0], debug=request.debug)}
    except PredictionError as exc:
        return {"error": exc.reason}


def _outcomes(request: TaskMessage, samples: list[Any] | None = None) -> list[dict[str, Any]]:
    outcomes = _replica.predict_many(request.samples if samples is None else samples,
                                     debug=request.debug)
    return [{"result": o.result} if o.error is None else {"error": o.error, "index": i}
            for i, o in enumerate(outcomes)]


def _answer(channel: Any, backend: Any, request: TaskMessage, reply: Any) -> None:
    """One answer for the message: to an inferq reply list, or to Celery's result backend."""
    if request.reply_to and Registry.is_reply_key(request.reply_to):
        body = {"id": request.id, "replica": _replica.id, "at": time.time()}
        body.update(reply if isinstance(reply, dict) else {"result": reply})
        channel.send_with_ack("RPUSH", request.reply_to, compact(body))
        channel.send_with_ack("EXPIRE", request.reply_to, REPLY_TTL_SECONDS)
    elif isinstance(reply, dict) and "error" in reply:
        backend.store_result(request.id, PredictionError(reply["error"], api=_replica.api.name),
                             states.FAILURE)
    else:
        backend.store_result(request.id, reply.get("result") if isinstance(reply, dict)
                             else reply, states.SUCCESS)


def _serve_async(channel: Any, request: TaskMessage) -> None:
    """An async request: ``in_progress`` now, then its answer in its state hash, kept for the
    API's ``async_retention``."""
    key, retention = request.async_state, int(_replica.api.compute.async_retention)
    channel.commands.hset(key, "status", "in_progress")
    reply = _predict_one(request)
    done = ({"status": "completed", "result": compact(reply["result"])} if "error" not in reply
            else {"status": "failed", "error": reply["error"]})
    fields = [item for pair in done.items() for item in pair]
    channel.send_with_ack("HSET", key, *fields, "done_at", time.time())
    channel.send_with_ack("EXPIRE", key, max(1, retention))


def _answer_job(channel: Any, request: TaskMessage, outcomes: list[dict[str, Any]],
                took: float | None = None) -> None:
    """A batch job's chunk: its answer into the job's results (with how long it took to
    predict), and a word to its driver."""
    job, chunk, first, indexes = request.job
    answer = job_answer(first, outcomes, indexes, took)
    for command in Registry.job_answer_commands(job, chunk, answer):
        channel.send_with_ack(*command)


def _answer_each(channel: Any, request: TaskMessage,
                 error: dict[str, str] | None = None) -> None:
    """A batch from inferq's clients: each live sample's answer (or ``error``) to its own
    waiter."""
    now = time.time()
    live = [i for i, (_, _, expires_at) in enumerate(request.replies) if expires_at > now]
    outcomes = ([dict(error) for _ in live] if error is not None
                else _outcomes(request, [request.samples[i] for i in live]))
    by_list: dict[str, list[dict[str, Any]]] = {}
    for i, outcome in zip(live, outcomes):
        reply_to, request_id, _ = request.replies[i]
        if not Registry.is_reply_key(reply_to):
            continue
        outcome.pop("index", None)
        by_list.setdefault(reply_to, []).append({"id": request_id, **outcome})
    for reply_to, answers in by_list.items():
        # One entry per waiter's list (Client.map: one for the whole batch), not per sample.
        reply = answers[0] if len(answers) == 1 else {"answers": answers}
        channel.send_with_ack("RPUSH", reply_to, compact({**reply, "replica": _replica.id,
                                                        "at": now}))
        channel.send_with_ack("EXPIRE", reply_to, REPLY_TTL_SECONDS)


def _quiet_celery(**_: Any) -> None:
    """Celery logs lines per task and per start; a replica's log keeps inferq's and warnings."""
    for name in ("celery", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
