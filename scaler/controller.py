"""``inferq controller``: the scaler's work where Kubernetes runs the replicas.

On a cluster (``inferq export kubernetes``), each API's replicas are a Deployment that KEDA
scales on the number :mod:`inferq.scaler.endpoint` serves; nobody here starts a replica. The
controller is the scaler in a mode that starts none (``Scaler(starts_replicas=False)``): it
drives batch jobs as every scaler does, and while it leads (the scalers' lease, so that the
gateway admits requests for an API at zero replicas) it does, each tick, what the leading
scaler does besides placing replicas:

- **recovery**: a replica whose liveness signal lapsed (its pod was SIGKILLed, its node lost:
  :mod:`inferq.registry.liveness`) is dead; what it held is put back at the head of its queue,
  and its record forgotten. One that failed to start leaves its failure for the status.
- **rolling**: after a redeploy, replicas of the old version reload the new one (a warm
  restart of their serving process), one at a time per API, only while all of its replicas
  are live and none failed on the new version.
- **statuses**: each API's status, judged as the leading scaler judges it
  (:func:`inferq.scaler.status.judge`), from the replicas the registry sees.

A replica is judged dead only after the controller has watched, without a gap, for longer
than a signal lives: after a broker outage or a new leader, every live replica has renewed
its signal before any is judged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from inferq import keys
from inferq.registry import (
    DeployedApi,
    FailureKind,
    Registry,
    ReplicaRecord,
    ReplicaStatus,
)
from inferq.scaler.decide import Autoscaler, Load
from inferq.scaler.status import judge

log = logging.getLogger("inferq.controller")

LEADER_TTL_SECONDS = 5.0  # as the scalers' (a dead leader is replaced after this)
GAP_SECONDS = 3.0  # a tick this late after the last one (a broker outage): watch afresh
SCAN_SECONDS = 5.0  # how often APIs deleted while replicas ran are looked for
ROLL_GRACE_SECONDS = 120.0  # beyond the API's timeout: a reload that takes longer is given up


def next_reload(version: str, records: list[ReplicaRecord], failed: bool) -> str | None:
    """The replica that reloads ``version`` next, or None: one at a time, only while every
    replica is live (capacity drops by one at most) and none failed on ``version`` (a broken
    version stops the roll, the old replicas serving on)."""
    if failed or any(r.status != ReplicaStatus.LIVE for r in records):
        return None
    old = sorted(r.id for r in records if r.version != version)
    return old[0] if old else None


@dataclass
class _Reload:
    replica: str
    since: float


class Controller:
    """What the leading controller does each tick; see the module doc."""

    def __init__(self, registry: Registry, host: str, autoscaler: Autoscaler,
                 load: Callable[[DeployedApi, list[ReplicaRecord]], Load]) -> None:
        self.registry = registry
        self.host = host
        self.autoscaler = autoscaler
        self.load = load  # the scaler's own measure of an API's load
        self.ticked_at = time.monotonic()  # the loop turns (the endpoint's /healthz)
        self._watching_since: float | None = None
        self._last_tick: float | None = None
        self._last_scan = float("-inf")
        self._reloads: dict[str, _Reload] = {}
        self._desired: dict[str, int] = {}

    def tick(self) -> None:
        now = self.ticked_at = time.monotonic()
        if self._last_tick is None or now - self._last_tick > GAP_SECONDS:
            self._watching_since = None
        self._last_tick = None  # set again once this tick went through
        if not self.registry.hosts.lead(self.host, LEADER_TTL_SECONDS):
            self._reloads.clear()
            return
        if self._watching_since is None:
            self._watching_since = now
        judging = now - self._watching_since > keys.ALIVE_TTL_SECONDS
        deployed = {d.name: d for d in self.registry.deployments.apis()}
        names = set(deployed)
        if now - self._last_scan >= SCAN_SECONDS:
            self._last_scan = now
            names |= set(self.registry.replicas.apis_with_replicas())
        for name in sorted(names):
            records = self.registry.replicas.of(name)
            if judging:
                records = self._recover_lapsed(name, records)
            api = deployed.get(name)
            if api is None:
                if not records:
                    self.registry.replicas.forget_api(name)
                continue
            self._roll(api, records, now)
            self._judge(api, records, now)
        for name in self.autoscaler.known() - set(deployed):
            self.autoscaler.forget(name)
            self._desired.pop(name, None)
        self._last_tick = now

    def _recover_lapsed(self, api: str, records: list[ReplicaRecord]) -> list[ReplicaRecord]:
        """Put back what replicas whose signal lapsed held, and forget them; return the
        others."""
        alive = self.registry.liveness.alive(api, [r.id for r in records])
        for record in records:
            if record.id in alive:
                continue
            requeued, failed = self.registry.queues.recover(api, record.id, keys.queue(api))
            if record.status == ReplicaStatus.ERROR and record.error:
                self.registry.replicas.set_failure(
                    api, record.host, record.failure or FailureKind.ERROR, record.error,
                    version=record.version)
            else:
                log.warning('api "%s": replica %s stopped renewing its liveness signal (its pod '
                            "was killed or its node lost): %d request(s) put back, %d answered "
                            "with an error", api, record.id, requeued, failed)
            self.registry.replicas.forget(api, record.id)
        return [r for r in records if r.id in alive]

    def _roll(self, deployed: DeployedApi, records: list[ReplicaRecord], now: float) -> None:
        """Bring one more old-version replica of an API to the deployed version, if it is
        its turn."""
        name, version = deployed.name, deployed.version
        pending = self._reloads.get(name)
        if pending is not None:
            record = next((r for r in records if r.id == pending.replica), None)
            done = record is None or (record.version == version and record.status in (
                ReplicaStatus.LIVE, ReplicaStatus.ERROR))
            if not done:
                if now - pending.since < deployed.api.compute.timeout + ROLL_GRACE_SECONDS:
                    return
                log.warning('api "%s": replica %s did not reload version %s in time; going on',
                            name, pending.replica, version)
            del self._reloads[name]
        failures = self.registry.replicas.failures(name)
        replica = next_reload(version, records, any(f.version == version for f in failures))
        if replica is not None:
            log.info('api "%s": replica %s reloads the deployed version %s', name, replica,
                     version)
            self.registry.liveness.ask_reload(name, replica)
            self._reloads[name] = _Reload(replica, now)

    def _judge(self, deployed: DeployedApi, records: list[ReplicaRecord], now: float) -> None:
        """The API's status, as the leading scaler would judge it with these replicas."""
        name = deployed.name
        if any(r.status == ReplicaStatus.LIVE and r.version == deployed.version for r in records):
            for failure in self.registry.replicas.failures(name):  # the version starts
                self.registry.replicas.clear_failure(name, failure.host)
        load = self.load(deployed, records)
        desired = self.autoscaler.desired(name, deployed.api.compute, load, now)
        if desired != self._desired.get(name):
            log.info('api "%s": %s -> %d replica(s) wanted (queued %d, in flight %d, live %d)',
                     name, self._desired.get(name, "new"), desired, load.queued,
                     load.in_flight, load.live)
            self._desired[name] = desired
        status, reason = judge(deployed.version, desired, None, records,
                               self.registry.replicas.failures(name))
        pods: dict[str, int] = {}
        for record in records:
            pods[record.host] = pods.get(record.host, 0) + 1
        self.registry.replicas.set_status(name, status, reason=reason, requested=desired,
                                          hosts=pods)
