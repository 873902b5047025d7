"""The scaler's decisions, as pure functions of what was observed.

Two decisions, both made once for the whole system by the leading scaler:

- :class:`Autoscaler` turns each API's load (queue depth, requests in flight, CPU use of its
  replicas) into a replica count within the API's bounds, scaling up fast and down slowly
  (stabilization windows, as Kubernetes' HPA does, so it does not flap: ray #18925).
- :func:`place` spreads those replicas over the hosts whose free cpu, mem and gpus fit their
  requests, keeping replicas where they already run.

Nothing here does I/O, so every rule is unit-tested without processes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from inferq.configs import Compute, format_cpu, format_mem
from inferq.registry import Capacity


@dataclass(frozen=True)
class Load:
    """What was observed of one API at one moment."""

    queued: int = 0  # samples waiting in its queue (a batch message counts each)
    in_flight: int = 0  # samples its replicas are predicting now
    live: int = 0  # live replicas
    cpu: float | None = None  # mean CPU use of a live replica, millicores (None: unknown)
    gpu: float | None = None  # mean utilisation of a live replica's GPUs, percent (NVML)


def recommend(compute: Compute, load: Load) -> int:
    """The replicas ``load`` needs right now, within [min_replicas, max_replicas].

    Queue depth plus in-flight requests is the primary signal (one request at a time per
    replica, so every waiting request wants a replica: this is what scales from zero, cortex
    #573); CPU utilisation against ``target_cpu_utilization`` of the cpu request is the
    second, for predictors whose requests arrive just fast enough never to queue (as in
    Kubernetes' HPA: ``ceil(live * utilisation / target)``).
    """
    by_queue = load.queued + load.in_flight
    by_cpu = 0
    # CPU counts only while there is work: an idle replica's housekeeping must not keep it
    # (or bring it back) when min_replicas is 0.
    if load.cpu is not None and load.live and by_queue:
        utilisation = 100.0 * load.cpu / compute.cpu
        by_cpu = math.ceil(load.live * utilisation / compute.target_cpu_utilization - 1e-9)
        # A replica serves one request at a time, so hot replicas earn one spare for the next
        # request, not as many as their CPU use suggests.
        by_cpu = min(by_cpu, by_queue + 1)
    # GPU work hardly shows on the CPU (cortex #443): NVML's utilisation is its signal.
    by_gpu = 0
    if load.gpu is not None and load.live and by_queue:
        by_gpu = math.ceil(load.live * load.gpu / compute.target_cpu_utilization - 1e-9)
        by_gpu = min(by_gpu, by_queue + 1)
    wanted = max(by_queue, by_cpu, by_gpu, compute.min_replicas)
    return min(wanted, compute.max_replicas)


@dataclass
class _History:
    desired: int
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)


class Autoscaler:
    """Desired replicas per API, stabilised over time (one instance lives in the leader)."""

    def __init__(self) -> None:
        self._apis: dict[str, _History] = {}

    def desired(self, api: str, compute: Compute, load: Load, now: float) -> int:
        """Record this moment's recommendation for ``api`` and return its desired replicas.

        A new API starts at ``init_replicas``. A higher count is taken once every
        recommendation of the last ``upscale_stabilization_period`` wants it; a lower one
        once every recommendation of the last ``downscale_stabilization_period`` allows it.
        """
        history = self._apis.get(api)
        if history is None:
            history = self._apis[api] = _History(compute.init_replicas)
            history.recommendations.append((now, compute.init_replicas))
        history.desired = min(max(history.desired, compute.min_replicas), compute.max_replicas)
        recommendations = history.recommendations
        recommendations.append((now, recommend(compute, load)))
        horizon = max(compute.upscale_stabilization_period, compute.downscale_stabilization_period)
        # Keep the recommendation in force at the horizon's start, not only the ones after it.
        while len(recommendations) > 1 and recommendations[1][0] <= now - horizon:
            recommendations.popleft()
        up = min(_window(recommendations, now, compute.upscale_stabilization_period))
        down = max(_window(recommendations, now, compute.downscale_stabilization_period))
        if up > history.desired:
            history.desired = up
        elif down < history.desired:
            history.desired = down
        return history.desired

    def forget(self, api: str) -> None:
        """Drop an API's history (deleted, or redeployed with new bounds from scratch)."""
        self._apis.pop(api, None)

    def known(self) -> set[str]:
        return set(self._apis)


def _window(recommendations: deque[tuple[float, int]], now: float, period: float) -> list[int]:
    """The recommendations in force during the last ``period`` seconds (each holds until the
    next one), so a slow sampler cannot make a window look shorter than it is."""
    if period <= 0:
        return [recommendations[-1][1]]
    start = now - period
    values = [r for t, r in recommendations if t > start]
    before = [r for t, r in recommendations if t <= start]
    if before:
        values.append(before[-1])
    return values


# -- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Replicas per API per host, and per API how many could not be placed and why."""

    hosts: dict[str, dict[str, int]]  # api -> host -> replicas
    unplaced: dict[str, tuple[int, str]]  # api -> (replicas, reason)


@dataclass
class _Free:
    cpu: int
    mem: int
    gpus: int
    capacity: Capacity


def place(
    desired: dict[str, int],
    requests: dict[str, Compute],
    hosts: dict[str, Capacity],
    previous: dict[str, dict[str, int]],
) -> Placement:
    """Place ``desired`` replicas of each API on ``hosts``.

    Replicas stay where ``previous`` put them while their host is alive and they are still
    wanted (moving a replica means restarting it); surplus replicas leave the host that has
    most of them; new ones go, one at a time, to the fitting host with the most free CPU.
    GPU APIs are placed first: they fit in fewer places.
    """
    free = {
        name: _Free(cap.cpu, cap.mem, cap.gpu_count, cap) for name, cap in sorted(hosts.items())
    }
    assigned: dict[str, dict[str, int]] = {}
    for api in sorted(desired):
        kept = {h: n for h, n in previous.get(api, {}).items() if h in free and n > 0}
        surplus = sum(kept.values()) - desired[api]
        while surplus > 0:
            busiest = max(sorted(kept), key=lambda h: kept[h])
            kept[busiest] -= 1
            surplus -= 1
            if kept[busiest] == 0:
                del kept[busiest]
        for host, count in kept.items():
            _take(free[host], requests[api], count)
        assigned[api] = kept
    unplaced: dict[str, tuple[int, str]] = {}
    order = sorted(desired, key=lambda a: (-requests[a].gpu, a))
    for api in order:
        request = requests[api]
        missing = desired[api] - sum(assigned[api].values())
        for placed in range(missing):
            fitting = [h for h in free if _fits(free[h], request)]
            if not fitting:
                unplaced[api] = (missing - placed, _why_not(request, free))
                break
            host = max(fitting, key=lambda h: (free[h].cpu, h))
            _take(free[host], request, 1)
            assigned[api][host] = assigned[api].get(host, 0) + 1
    return Placement({a: h for a, h in assigned.items() if h}, unplaced)


def _fits(free: _Free, request: Compute) -> bool:
    return (
        free.cpu >= request.cpu
        and free.mem >= (request.mem or 0)
        and free.gpus >= request.gpu
    )


def _take(free: _Free, request: Compute, count: int) -> None:
    free.cpu -= request.cpu * count
    free.mem -= (request.mem or 0) * count
    free.gpus -= request.gpu * count


def _why_not(request: Compute, free: dict[str, _Free]) -> str:
    """Why a replica fits nowhere, e.g. ``needs gpu 1, host has 0`` (the README's example)."""
    if not free:
        return "no scaler is running (start one with `inferq scaler` or `inferq up`)"
    reasons = {name: _shortfall(request, f) for name, f in free.items()}
    if len(reasons) == 1:
        return next(iter(reasons.values()))
    return "; ".join(f"{name}: {reason}" for name, reason in reasons.items())


def _shortfall(request: Compute, free: _Free) -> str:
    cap = free.capacity
    if free.gpus < request.gpu:
        total = cap.gpu_count
        held = "" if free.gpus == total else f" free ({total} in total)"
        return f"needs gpu {request.gpu}, host has {max(free.gpus, 0)}{held}"
    if free.cpu < request.cpu:
        return (
            f"needs cpu {format_cpu(request.cpu)}, host has {format_cpu(max(free.cpu, 0))} free "
            f"of {format_cpu(cap.cpu)}"
        )
    return (
        f"needs mem {format_mem(request.mem or 0)}, host has {format_mem(max(free.mem, 0))} "
        f"free of {format_mem(cap.mem)}"
    )
