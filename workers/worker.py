"""``inferq worker API_NAME``: one replica, as a Celery worker on the API's queue.

The worker's main process holds the broker connection and the message; its one pool child
bootstraps the predictor (``worker_process_init``) and runs predictions. When that child dies
mid-prediction, the main process notices at once and Celery retries the task (see
``inferq.workers.app``); when the retry dies too, :func:`_on_task_failure` answers the caller.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, signals
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool
from celery.exceptions import SecurityWarning

from inferq.errors import PredictionError, PredictorError, UnknownAPI
from inferq.processes import die_with_parent
from inferq.registry import Registry
from inferq.workers.app import TASK_NAME, make_app, queue_name
from inferq.workers.replica import Replica, bootstrap, replica_id

log = logging.getLogger("inferq.worker")

EXIT_INIT_FAILED = 3


class _State:
    """What the main process and its pool child share (set up before the fork)."""

    def __init__(self, api: str, broker_url: str, registry: Registry) -> None:
        self.api = api
        self.broker_url = broker_url
        self.replica = replica_id()  # the main process's PID: stable across child restarts
        self.init_failed = multiprocessing.Value("b", 0, lock=False)
        self.loaded: Replica | None = None  # only in the pool child
        self.registry = registry  # the main process's; the pool child connects anew


_state: _State | None = None


def run_worker(api: str, broker_url: str, *, loglevel: str = "INFO") -> int:
    """Serve ``api`` until SIGTERM (warm shutdown: the current request finishes). Exit code."""
    global _state
    logging.basicConfig(
        level=loglevel,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    registry = Registry(broker_url)
    registry.ping()
    if registry.api(api) is None:
        raise UnknownAPI(f'no API named "{api}" is deployed (see `inferq get`)')
    if hasattr(os, "getuid") and os.getuid() == 0:
        # Celery's eight-line banner about root would open every replica's log; one line says it.
        warnings.filterwarnings("ignore", category=SecurityWarning)
        log.warning("running as root: prefer an unprivileged user (the Docker image uses one)")
    _state = _State(api, broker_url, registry)
    app = make_app(broker_url)
    register_task(app)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.after_setup_logger.connect(_quiet_celery, weak=False)
    signals.task_failure.connect(_on_task_failure, weak=False)
    signals.task_retry.connect(_on_task_retry, weak=False)
    worker = app.Worker(
        hostname=f"{api}@{_state.replica}",
        queues=[queue_name(api)],
        concurrency=1,
        pool=_PromptReapingTaskPool,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not app.conf.worker_send_task_events,  # INFERQ_TASK_EVENTS: Flower
        optimization="fair",
        quiet=True,  # no banner: a replica's log is about its predictions
    )
    stopped = threading.Event()
    threading.Thread(target=_stop_on_init_failure, args=(stopped,), daemon=True).start()
    try:
        worker.start()
    finally:
        stopped.set()
        if not _state.init_failed.value:
            registry.remove_replica(api, _state.replica)
    if _state.init_failed.value:
        return EXIT_INIT_FAILED
    return worker.exitcode or 0


class _PromptReapingPool(AsynPool):
    """Celery's prefork pool, noticing at once that its child died mid-prediction.

    Celery reaps a child when the child's sentinel pipe closes, but the kernel closes it a
    moment before the child can be reaped; a reap that comes too early finds nothing, and the
    next try is the pool's 5-second maintenance timer (celery #9588), so a killed
    prediction's retry would wait up to 5 s.
    """

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        deadline = time.monotonic() + 0.5  # bounded: the main loop must not hang on a child
        while proc._popen is not None and proc._popen.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        super()._event_process_exit(hub, proc)


class _PromptReapingTaskPool(TaskPool):
    Pool = _PromptReapingPool


def register_task(app: Celery) -> None:
    """Register :data:`TASK_NAME` on ``app``: predict one sample with this process's replica."""

    @app.task(
        name=TASK_NAME,
        bind=True,
        max_retries=1,  # only worker-lost retries use it: predict() errors are not retried
        default_retry_delay=0,
        ignore_result=False,
    )
    def predict(self, sample: Any, debug: bool = False) -> Any:
        return _serve(self.request, sample, debug)


def _serve(request: Any, sample: Any, debug: bool) -> Any:
    replica = _state.loaded
    reply_to = _reply_to(request)
    # The in-flight marker is what the scaler counts as "busy" (queue depth alone misses
    # the requests being predicted) and how a lost host's requests are found again.
    _state.registry.start_request(_state.api, _state.replica, request.id)
    try:
        prediction = replica.predict(sample, debug=bool(debug))
    except PredictionError as exc:
        if reply_to:
            _reply(reply_to, request.id, error=exc.reason)
        raise PredictionError(exc.reason, api=_state.api) from None
    finally:
        _state.registry.end_request(_state.api, _state.replica)
    if reply_to:
        _reply(reply_to, request.id, result=prediction)
    return prediction


def _reply_to(request: Any) -> str | None:
    """The reply list of an inferq client, or None for a plain Celery caller.

    Celery itself sets ``reply_to`` on every message it sends (for its rpc:// backend); a
    plain Celery caller reads the result from the result backend instead.
    """
    reply_to = getattr(request, "reply_to", None)
    return reply_to if reply_to and Registry.is_reply_key(reply_to) else None


def _reply(reply_to: str, task_id: str, *, result: Any = None, error: str | None = None) -> None:
    reply = {"id": task_id, "replica": _state.replica, "at": time.time()}
    if error is None:
        reply["result"] = result
    else:
        reply["error"] = error
    _state.registry.push_reply(reply_to, reply)


def _on_process_init(**_: Any) -> None:
    """In the pool child: bootstrap the predictor; on failure stop the whole replica."""
    if _state.init_failed.value:
        os._exit(EXIT_INIT_FAILED)  # a child forked while the replica is stopping
    die_with_parent()  # a SIGKILLed worker must not leave its pool child serving
    _state.registry = Registry(_state.broker_url)
    try:
        _state.loaded = bootstrap(_state.api, _state.registry, _state.replica)
    except (PredictorError, UnknownAPI) as exc:
        log.error("%s", exc)
        _state.init_failed.value = 1
        os._exit(EXIT_INIT_FAILED)


def _quiet_celery(**_: Any) -> None:
    """Celery logs two INFO lines per task; a replica's log keeps inferq's and warnings."""
    for name in ("celery", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _stop_on_init_failure(stopped: threading.Event) -> None:
    """In the main process: when the child's bootstrap failed, shut the replica down.

    Retrying in a new child would fail the same way; the scaler decides about restarts.
    """
    while not stopped.wait(0.1):
        if _state.init_failed.value:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    """In the main process: a prediction whose pool child died was sent again (to any replica);
    the dead child's in-flight marker must not leave this replica looking busy."""
    if _state is None or not isinstance(getattr(reason, "exc", None), WorkerLostError):
        return
    _state.registry.end_request(_state.api, _state.replica, task_id=request.id)


def _on_task_failure(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    """In the main process: a task whose replica died twice gets a clear error reply."""
    if not isinstance(exception, WorkerLostError) or _state is None:
        return
    _state.registry.end_request(_state.api, _state.replica, task_id=task_id)
    reply_to = _reply_to(sender.request)
    if not reply_to:
        return
    _reply(
        reply_to,
        task_id,
        error=(
            "the replica died while predicting, and again when the request was retried "
            f"({exception}); the request was not retried a third time"
        ),
    )
