"""``inferq scaler``: reconcile deployed APIs with replica processes, continuously.

Every scaler runs the same loop, a small controller:

    observe (registry, queues, its own processes) -> decide -> act -> report

One scaler at a time leads (a Redis key with a TTL): it decides, for the whole system, each
API's replica count (:class:`scaler.decide.Autoscaler`) and which host runs how many
(:func:`scaler.decide.place`), writes that plan and each API's status to the registry, and
requeues the requests of hosts whose heartbeat stopped. Every scaler, the leader included,
then brings its own host's replicas to the plan: it starts what is missing (with backoff
when replicas keep dying), rolls a new version over before stopping the old one, stops what
is surplus with a warm shutdown, and kills a replica whose memory exceeds its ``mem``.

With ``starts_replicas=False`` (``inferq controller``, where Kubernetes runs the replicas) it
starts none: :class:`inferq.scaler.controller.Controller` does the leader's part instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import redis

from inferq import keys
from inferq.configs import format_mem
from inferq.jobs import JobRunner
from inferq.processes import pid_alive, wait_until
from inferq.registry import (
    Capacity,
    DeployedApi,
    FailureKind,
    Plan,
    Registry,
    ReplicaRecord,
    ReplicaStatus,
    Usage,
)
from inferq.scaler.controller import Controller
from inferq.scaler.decide import Autoscaler, Load, place
from inferq.scaler.host import Nvml, ProcessTreeSampler
from inferq.scaler.replicas import LogPump, ReplicaProcess, start_replica
from inferq.scaler.status import judge
from inferq.streams import StreamRunner, Streams

log = logging.getLogger("inferq.scaler")

TICK_SECONDS = 0.25
SAMPLE_SECONDS = 1.0  # CPU and memory of replicas
LEADER_TTL_SECONDS = 5.0  # a dead leader is replaced after this
HOST_TIMEOUT_SECONDS = 6.0  # a host whose heartbeat is older is gone
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
STOP_GRACE_SECONDS = 30.0  # past its API's timeout, a replica that does not stop is killed


@dataclass
class _Backoff:
    """Restarts of one API's replicas on this host: 1 s, 2 s, 4 s ... up to a minute.

    A redeploy (e.g. a fixed requirements.txt) starts its first replica at once.
    """

    failures: int = 0
    next_start: float = 0.0
    version: str | None = None  # of the replica that failed last

    def failed(self, now: float, version: str | None = None) -> float:
        self.failures += 1
        self.version = version
        delay = min(BACKOFF_FIRST_SECONDS * 2 ** (self.failures - 1), BACKOFF_MAX_SECONDS)
        self.next_start = now + delay
        return delay

    def recovered(self) -> None:
        self.failures = 0
        self.next_start = 0.0
        self.version = None


class Scaler:
    """One host's scaler; see the module doc."""

    def __init__(self, broker_url: str, capacity: Capacity, host: str, *,
                 loglevel: str = "INFO", tick: float = TICK_SECONDS, echo_logs=None,
                 starts_replicas: bool = True) -> None:
        self.broker_url = broker_url
        self.capacity = capacity
        self.host = host
        self.loglevel = loglevel
        self.tick_seconds = tick
        self.registry = Registry(broker_url)
        self.autoscaler = Autoscaler()
        self.sampler = ProcessTreeSampler()
        self.nvml = Nvml()  # without a driver it reports nothing and costs nothing
        self.logs = LogPump(self.registry, echo=echo_logs)
        self.job_runner = JobRunner(self.registry, broker_url)
        self.stream_runner = StreamRunner(self.registry, broker_url)
        self.streams = Streams(self.registry)
        self.replicas: list[ReplicaProcess] = []
        self.backoff: dict[str, _Backoff] = {}
        self.failed_here: set[str] = set()  # APIs with a failure recorded from this host
        self.deleted_at: dict[str, float] = {}
        self._last_sample = 0.0
        self._stop = threading.Event()
        # `inferq controller`: Kubernetes starts the replicas, this leads and watches them
        self.controller = (None if starts_replicas else
                           Controller(self.registry, host, self.autoscaler, self._load))

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Reconcile until SIGTERM or SIGINT; then stop every replica (warm shutdown)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        if self.controller is not None:
            log.info("controller %s: Kubernetes runs the replicas", self.host)
        else:
            log.info("scaler %s: %s", self.host, self.capacity.describe())
        if os.getuid() == 0 and self.controller is None:
            log.warning("running as root, and so do the replicas: prefer an unprivileged user "
                        "(the Docker image uses one)")
        forgotten = False
        try:
            while not self._stop.is_set():
                try:
                    if not forgotten:
                        self._forget_previous_run()
                        forgotten = True
                    self.tick()
                except redis.RedisError as exc:
                    log.warning("the broker does not answer (%s); retrying", exc)
                    self._stop.wait(1.0)
                self._stop.wait(self.tick_seconds)
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        """One round of observe, decide, act."""
        deployed = {d.name: d for d in self.registry.deployments.apis()}
        if self.controller is not None:
            self.controller.tick()
        else:
            self._tick_replicas(deployed)
        self.job_runner.tick()
        self.stream_runner.tick(deployed)

    def _tick_replicas(self, deployed: dict[str, DeployedApi]) -> None:
        """This host's replicas, and everyone's plan while it leads."""
        now = time.monotonic()
        self._reap(deployed, now)
        if now - self._last_sample >= SAMPLE_SECONDS:
            self._last_sample = now
            self._sample(deployed)
        self.registry.hosts.heartbeat(self.host, self.capacity, self._running())
        if self.registry.hosts.lead(self.host, LEADER_TTL_SECONDS):
            plan = self.decide(deployed)
        else:
            plan = self.registry.hosts.plan()
        self._reconcile(deployed, plan.hosts, now)

    def shutdown(self) -> None:
        """Stop every replica (each finishes its request), then leave the system."""
        for runner in (self.job_runner, self.stream_runner):
            with contextlib.suppress(redis.RedisError):
                runner.shutdown()
        for replica in self.replicas:
            replica.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 60
        for replica in self.replicas:
            try:
                replica.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.kill()
                replica.process.wait()
        try:
            for replica in self.replicas:
                self.registry.replicas.forget(replica.api, replica.id)
            self.registry.hosts.remove(self.host)
            self.registry.hosts.resign(self.host)
            self.logs.close()
        except redis.RedisError:
            pass
        self.nvml.close()
        self.replicas.clear()

    # -- the leader's decisions ---------------------------------------------------------------

    def decide(self, deployed: dict[str, DeployedApi]) -> Plan:
        """Desired replicas and placements for every API, and their statuses; the new plan."""
        server_now = self.registry.store.now()
        alive = {}
        for name, record in self.registry.hosts.all().items():
            if server_now - record.heartbeat <= HOST_TIMEOUT_SECONDS:
                alive[name] = record.capacity
            else:
                self._forget_host(name, deployed)
        now = time.monotonic()
        desired: dict[str, int] = {}
        observed: dict[str, list[ReplicaRecord]] = {}
        previous = self.registry.hosts.plan()
        previous_desired = previous.desired
        for name, api in deployed.items():
            records = [r for r in self.registry.replicas.of(name) if r.host in alive]
            observed[name] = records
            load = self._load(api, records)
            desired[name] = self.autoscaler.desired(name, api.api.compute, load, now)
            if desired[name] != previous_desired.get(name):
                log.info('api "%s": %s -> %d replica(s) (queued %d, in flight %d, live %d, '
                         "cpu %s)", name, previous_desired.get(name, "new"), desired[name],
                         load.queued, load.in_flight, load.live,
                         "?" if load.cpu is None else f"{load.cpu:.0f}m")
        for name in self.autoscaler.known() - set(deployed):
            self.autoscaler.forget(name)
        placement = place(
            desired, {n: a.api.compute for n, a in deployed.items()}, alive,
            previous.hosts,
        )
        plan = Plan(placement.hosts, desired, placement.unplaced)
        self.registry.hosts.set_plan(plan)
        for name, api in deployed.items():
            status, reason = judge(
                api.version, desired[name], placement.unplaced.get(name), observed[name],
                self.registry.replicas.failures(name),
            )
            self.registry.replicas.set_status(
                name, status, reason=reason, requested=desired[name],
                hosts=placement.hosts.get(name, {}),
            )
        return plan

    def _load(self, deployed: DeployedApi, records: list[ReplicaRecord]) -> Load:
        api = deployed.name
        live = [r.id for r in records if r.status == ReplicaStatus.LIVE]
        usage = self.registry.replicas.usage(api)
        # In samples, not messages: a queue of batches scales as the same requests alone.
        in_flight, held_extra = self.registry.queues.in_flight_samples(
            api, [r.id for r in records])
        # A stream's entries no replica has seen yet want replicas as queued requests do.
        unseen = self.streams.unseen(api) if deployed.api.stream else 0
        return Load(
            queued=max(0, self.registry.queues.queued_samples(keys.queue(api)) - held_extra)
            + unseen,
            in_flight=in_flight,
            live=len(live),
            cpu=_mean(usage, live, "cpu"),
            gpu=_mean(usage, live, "gpu"),
        )

    def _forget_host(self, host: str, deployed: dict[str, DeployedApi],
                     why: str = "stopped beating") -> None:
        """A host is gone: requeue what its replicas held and forget them."""
        requeued = 0
        for name in set(deployed) | set(self.registry.replicas.apis_with_replicas()):
            for record in self.registry.replicas.of(name):
                if record.host == host:
                    requeued += self.registry.queues.recover(name, record.id, keys.queue(name))[0]
                    self.registry.replicas.forget(name, record.id)
            self.registry.replicas.clear_failure(name, host)
        self.registry.hosts.remove(host)
        if requeued or why == "stopped beating":
            log.warning("host %s %s: its replicas are placed again (%d request(s) requeued)",
                        host, why, requeued)

    # -- this host's replicas -----------------------------------------------------------------

    def _reconcile(self, deployed: dict[str, DeployedApi], plan: dict[str, dict[str, int]],
                   now: float) -> None:
        running = {r.api for r in self.replicas}
        for name in sorted(set(deployed) | running):
            mine = [r for r in self.replicas if r.api == name and not r.stopping]
            if name not in deployed:
                self._drain(name, mine, now)
                continue
            self.deleted_at.pop(name, None)
            target = plan.get(name, {}).get(self.host, 0)
            self._roll(deployed[name], mine, target, now)

    def _roll(self, deployed: DeployedApi, mine: list[ReplicaProcess], target: int,
              now: float) -> None:
        """Bring this host's replicas of one API to ``target`` of the deployed version."""
        name = deployed.name
        statuses = {r.id: r.status for r in self.registry.replicas.of(name)}
        current = [r for r in mine if r.version == deployed.version]
        old = [r for r in mine if r.version != deployed.version]
        live = [r for r in current if statuses.get(r.id) == ReplicaStatus.LIVE]
        if live:
            self.backoff.setdefault(name, _Backoff()).recovered()
            if name in self.failed_here:
                self.registry.replicas.clear_failure(name, self.host)
                self.failed_here.discard(name)
        if len(current) > target:
            busy = self.registry.queues.in_flight(name, [r.id for r in current])
            # Stop replicas still starting first, then idle ones, then the newest.
            ranked = sorted(
                current,
                key=lambda r: (r in live, r.id in busy, -r.started_at),
            )
            for replica in ranked[: len(current) - target]:
                self._stop_replica(replica)
        elif len(current) < target:
            self._start(deployed, target - len(current), old, now)
        # Old replicas serve until new ones are live: a redeploy never drops capacity.
        keep_old = max(0, min(target, len(old) + len(live)) - len(live))
        for replica in sorted(old, key=lambda r: r.started_at)[: len(old) - keep_old]:
            self._stop_replica(replica)

    def _start(self, deployed: DeployedApi, count: int, old: list[ReplicaProcess],
               now: float) -> None:
        backoff = self.backoff.setdefault(deployed.name, _Backoff())
        if backoff.version not in (None, deployed.version):
            backoff.recovered()
        if now < backoff.next_start:
            return
        need = deployed.api.compute.gpu
        for _ in range(count):
            gpus: tuple[int, ...] = ()
            if need:
                free = self._free_gpus()
                if len(free) < need:
                    # A GPU is never shared: an old version's replica makes room first.
                    if old:
                        self._stop_replica(old.pop(0))
                    return
                gpus = tuple(free[:need])
            replica = start_replica(
                deployed.name, deployed.version, self.broker_url, self.host, gpus, self.logs,
                loglevel=self.loglevel,
            )
            self.registry.replicas.update(
                deployed.name, replica.id, status=ReplicaStatus.PENDING, host=self.host,
                replica_pid=replica.pid,
                version=deployed.version, gpus=list(gpus),
            )
            self.replicas.append(replica)
            log.info('api "%s": started replica %s%s', deployed.name, replica.id,
                     f" on GPU {','.join(map(str, gpus))}" if gpus else "")

    def _free_gpus(self) -> list[int]:
        taken = {g for r in self.replicas if r.exited() is None for g in r.gpus}
        return [g for g in self.capacity.gpus if g not in taken]

    def _drain(self, name: str, mine: list[ReplicaProcess], now: float) -> None:
        """A deleted API: its replicas answer what is queued, then stop (warm shutdown)."""
        started = self.deleted_at.setdefault(name, now)
        if mine and self.registry.queues.length(keys.queue(name)) and now - started < 60:
            return
        for replica in mine:
            self._stop_replica(replica)

    def _stop_replica(self, replica: ReplicaProcess) -> None:
        """Warm shutdown; the record says "stopping" so the replica no longer counts as live."""
        replica.stop()
        self.registry.replicas.update(replica.api, replica.id, status=ReplicaStatus.STOPPING)

    def _reap(self, deployed: dict[str, DeployedApi], now: float) -> None:
        """Notice replicas that exited; record why unexpected exits happened."""
        for replica in list(self.replicas):
            code = replica.exited()
            if code is None:
                api = deployed.get(replica.api)
                grace = (api.api.compute.timeout if api else 60.0) + STOP_GRACE_SECONDS
                if replica.stopping and now - replica.stopping_since > grace:
                    replica.kill()  # a warm shutdown that hangs past any request's timeout
                continue
            record = next(
                (r for r in self.registry.replicas.of(replica.api) if r.id == replica.id),
                ReplicaRecord(replica.id),
            )
            self._recover(replica, record)  # first: a broker error retries it next tick
            self.replicas.remove(replica)
            self.sampler.forget(replica.pid)
            self.registry.replicas.forget(replica.api, replica.id)
            if replica.api not in deployed:
                self._forget_if_drained(replica.api)
                continue
            if replica.stopping and not replica.oom:
                continue
            kind, message = self._failure(replica, code, record, deployed[replica.api])
            delay = self.backoff.setdefault(replica.api, _Backoff()).failed(now, replica.version)
            self.registry.replicas.set_failure(replica.api, self.host, kind, message,
                                               version=replica.version)
            self.failed_here.add(replica.api)
            log.error('api "%s": %s; next replica in %.0fs', replica.api, message, delay)

    def _recover(self, replica: ReplicaProcess, record: ReplicaRecord) -> None:
        """Put back what a replica that exited held (its supervisor does it unless it was
        killed itself), once its serving process is gone too."""
        replica.kill()  # the serving process, if it outlived its supervisor a moment
        serving = record.pid
        if serving and serving != replica.pid:
            try:
                wait_until(lambda: not pid_alive(serving), 5, interval=0.01,
                           what=f"process {serving} gone")
            except TimeoutError:
                log.error("replica %s: its serving process %s does not die", replica.id, serving)
                return
        if replica.oom:
            return  # its requests were answered when it was killed
        requeued, failed = self.registry.queues.recover(replica.api, replica.id,
                                                       keys.queue(replica.api))
        if requeued or failed:
            log.warning('api "%s": replica %s died holding %d request(s): %d put back, '
                        "%d answered with an error", replica.api, replica.id,
                        requeued + failed, requeued, failed)

    def _forget_if_drained(self, name: str) -> None:
        if not any(r.api == name for r in self.replicas) and not self.registry.replicas.of(name):
            self.registry.replicas.forget_api(name)

    @staticmethod
    def _failure(replica: ReplicaProcess, code: int, record: ReplicaRecord,
                 deployed: DeployedApi) -> tuple[FailureKind, str]:
        if replica.oom:
            mem = format_mem(deployed.api.compute.mem or 0)
            return (FailureKind.OOM,
                    f"replica {replica.id} used more memory than its mem request ({mem})")
        if replica.init_failed() and record.error:
            return record.failure or FailureKind.ERROR, record.error
        return FailureKind.ERROR, f"replica {replica.id} exited with code {code}"

    def _sample(self, deployed: dict[str, DeployedApi]) -> None:
        """CPU and memory of each replica's process tree; kill what exceeds its ``mem``."""
        usage: dict[str, dict[str, Usage]] = {}
        for replica in self.replicas:
            if replica.exited() is not None:
                continue
            sample = self.sampler.sample(replica.pid)
            if sample is None:
                continue
            usage.setdefault(replica.api, {})[replica.id] = Usage(
                cpu=sample.cpu_millicores, rss=sample.rss,
                gpu=self.nvml.utilization(replica.gpus) if replica.gpus else None,
            )
            api = deployed.get(replica.api)
            mem = api.api.compute.mem if api is not None else None
            if mem and sample.rss > mem and not replica.oom:
                log.error('api "%s": replica %s uses %s, over its mem request %s: stopping it',
                          replica.api, replica.id, format_mem(sample.rss), format_mem(mem))
                replica.oom = True
                replica.kill()
                # Retrying the request would likely kill the next replica too: answer it.
                self.registry.queues.fail_held(replica.api, replica.id, (
                    f"the replica ran out of memory while predicting (it used "
                    f"{format_mem(sample.rss)}, over its mem request {format_mem(mem)})"
                ))
        for name, values in usage.items():
            self.registry.replicas.set_usage(name, values)

    def _running(self) -> dict[str, int]:
        """Replicas per API on this host (those not stopping)."""
        return {api: sum(1 for r in self.replicas if r.api == api and not r.stopping)
                for api in {r.api for r in self.replicas}}

    def _forget_previous_run(self) -> None:
        """Replicas a previous scaler of this host started died with it: forget them, and
        requeue the requests they held, so nothing is adopted twice or waits an hour."""
        if self.controller is not None:
            return  # it started none (the controller recovers replicas by their signal)
        deployed = {d.name: d for d in self.registry.deployments.apis()}
        self._forget_host(self.host, deployed, why="restarted")


def _mean(usage: dict[str, Usage], replicas: list[str], key: str) -> float | None:
    """The mean of ``key`` over the replicas that reported it; None when none did."""
    values = [value for r in replicas if r in usage
              and (value := getattr(usage[r], key)) is not None]
    return sum(values) / len(values) if values else None
