"""The serving process of a replica: a Celery worker, ``solo`` pool, on the API's queue.

One process does it all, so a request crosses one process, not two (a prefork pool child
doubles the hops; ARCHITECTURE.md, "Processes"): the predictor is bootstrapped here before
Celery's loop starts (nothing forks afterwards, so CUDA is safe, celery #3402), and each
message is served
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
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals, states
from celery.exceptions import SecurityWarning
from celery.worker import pidbox
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer, control

from inferq import keys, messages
from inferq.errors import PredictionError, PredictorError, UnknownAPI
from inferq.messages import TASK_NAME, AsyncStatus, Outcome
from inferq.registry import EXIT_INIT_FAILED, Registry
from inferq.workers.app import make_app
from inferq.workers.output import whole_lines
from inferq.workers.predictor import project_relative
from inferq.workers.replica import Replica, bootstrap
from inferq.workers.transport import QUEUE_OPTION, TAKEN_KEY_OPTION

log = logging.getLogger("inferq.worker")

_replica: Replica | None = None  # the loaded predictor this process serves
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _ProjectPaths(logging.Formatter):
    """Log lines (tracebacks of predict() included) naming the project's files as in the
    project, not by the folder this host unpacked it in."""

    def __init__(self, fmt: str, project: Path) -> None:
        super().__init__(fmt)
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        return project_relative(super().format(record), self.project)


def serve(api: str, broker_url: str, replica_id: str, *, loglevel: str = "INFO") -> int:
    """Bootstrap ``api``'s predictor, then serve its queue until SIGTERM (warm shutdown: the
    current request finishes). Returns the exit code."""
    global _replica
    whole_lines()  # a long print() and a log record never cut each other's line
    logging.basicConfig(level=loglevel, format=_LOG_FORMAT)
    registry = Registry(broker_url, max_connections=4)
    registry.ping()
    # Celery's eight-line banner about root would open every replica's log: the scaler says
    # it once for all its replicas.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    try:
        _replica = bootstrap(api, registry, replica_id)
    except (PredictorError, UnknownAPI) as exc:
        log.error("%s", exc)
        return EXIT_INIT_FAILED
    for handler in logging.getLogger().handlers:  # tracebacks name predictor.py, not the cache
        handler.setFormatter(_ProjectPaths(_LOG_FORMAT, _replica.project))
    app = make_app(broker_url)
    app.conf.update(
        broker_transport="inferq.workers.transport:Transport",
        worker_consumer="inferq.workers.worker:ReplicaConsumer",
        broker_transport_options={
            **app.conf.broker_transport_options,
            TAKEN_KEY_OPTION: keys.taken(api, replica_id),
            QUEUE_OPTION: keys.queue(api),
        },
    )
    register_task(app)
    worker = app.Worker(
        hostname=f"{api}@{replica_id}",
        queues=[keys.queue(api)],
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not app.conf.worker_send_task_events,  # INFERQ_TASK_EVENTS: Flower
        optimization="fair",
        quiet=True,  # no banner: a replica's log is about its predictions
        # The scaler reads the replica's output line by line already; Celery's redirection
        # of stdout and stderr into its logger would log a traceback one character a line
        # and a predictor's print() as a WARNING.
        redirect_stdouts=False,
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
        default_steps = [  # noqa: RUF012  (Celery's own attribute, read as it is)
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
        return _serving().predict(sample, debug=bool(debug))


class _Active:
    """The message being predicted, as ``celery inspect active`` shows it (a Celery Request
    would cost more than the prediction; this is what the toolbox reads of one)."""

    def __init__(self, request: messages.Task, message: Any, hostname: str) -> None:
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
    replica = _serving()
    retention = replica.api.compute.async_retention

    def outcomes(channel: Any, request: messages.Task) -> list[Outcome]:
        if request.async_state is not None:
            channel.commands.hset(request.async_state, "status", AsyncStatus.IN_PROGRESS.value)
        if request.replies is None:
            return replica.predict_many(request.samples, debug=request.debug)
        # A batch from inferq's clients: only the samples whose caller still waits.
        now = time.time()
        live = [i for i, (_, _, expires_at) in enumerate(request.replies) if expires_at > now]
        predicted = dict(zip(live, replica.predict_many([request.samples[i] for i in live],
                                                        debug=request.debug), strict=True))
        skipped = Outcome(error="its caller stopped waiting")  # answered to nobody
        return [predicted.get(i, skipped) for i in range(len(request.samples))]

    def serve(channel: Any, request: messages.Task, message: Any) -> None:
        active = _Active(request, message, hostname)
        worker_state.active_requests.add(active)
        started = time.monotonic()
        if send_event is not None:
            send_event("task-received", uuid=request.id, name=TASK_NAME, args="", kwargs="",
                       retries=0, eta=None, expires=None)
            send_event("task-started", uuid=request.id)
        try:
            began = time.perf_counter()
            answered = outcomes(channel, request)
            _deliver(channel, backend, request, answered, time.perf_counter() - began)
        finally:
            worker_state.active_requests.discard(active)
        if send_event is not None:
            send_event("task-succeeded", uuid=request.id, result="",
                       runtime=time.monotonic() - started)

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        try:
            request = messages.Task.from_message(message)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            log.error("dropped a message that is not an inferq.predict task: %s", exc)
            message.ack()
            return
        channel = message.channel
        for command in messages.dequeued(request):  # the queue's count drops with the ack
            channel.send_with_ack(*command)
        if request.expired or request.id in revoked:
            message.ack()  # its caller stopped waiting: it must not run later
            return
        try:
            serve(channel, request, message)
        except Exception as exc:
            log.exception("serving task %s failed", request.id)
            channel.take_with_ack()  # whatever half-built answer there was
            error = Outcome(error=f"the replica failed to serve the request: {exc!r}")
            for command in messages.dequeued(request):
                channel.send_with_ack(*command)
            _deliver(channel, backend, request, [error] * len(request.samples))
        for command in replica.take_tracking():  # counts and tracking ride on the ack
            channel.send_with_ack(*command)
        message.ack()

    def _deliver(channel: Any, backend: Any, request: messages.Task, answered: list[Outcome],
                 took: float | None = None) -> None:
        """Every sample's answer, sent with the acknowledgement (a plain Celery caller's to
        Celery's result backend)."""
        answer = messages.answer(request, answered, replica=replica.id, took=took,
                                 retention=retention)
        for command in answer.commands:
            channel.send_with_ack(*command)
        result = answer.backend
        if result is None:
            return
        if result.error is not None:
            backend.store_result(request.id, PredictionError(result.error, api=replica.api.name),
                                 states.FAILURE)
        else:
            backend.store_result(request.id, result.result, states.SUCCESS)

    return handle


def _serving() -> Replica:
    if _replica is None:
        raise RuntimeError("no predictor is loaded in this process (serve() loads it)")
    return _replica


def _quiet_celery(**_: Any) -> None:
    """Celery logs lines per task and per start; a replica's log keeps inferq's and warnings."""
    for name in ("celery", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
