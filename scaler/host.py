"""What a scaler knows about its host: capacity, GPUs (through NVML) and replicas' usage.

Nothing here needs a GPU or an NVIDIA driver: without one, :class:`Nvml` reports no GPUs and
:func:`detect_capacity` a GPU-less host. Tests declare GPUs with :func:`declared_capacity`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from inferq.configs import parse_cpu, parse_mem
from inferq.registry import Capacity

log = logging.getLogger(__name__)

_PROC_SELF = Path("/proc/self")


# -- capacity ---------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(controller: str, proc: Path) -> list[Path]:
    """This process's cgroup folders for ``controller`` ("" = cgroup v2), innermost first.

    Limits of ancestors apply too, so callers take the smallest limit along the list.
    """
    memberships, mounts = _read(proc / "cgroup"), _read(proc / "mountinfo")
    if not memberships or not mounts:
        return []
    path = None
    for line in memberships.splitlines():
        _, controllers, cgroup_path = line.split(":", 2)
        if controller in controllers.split(","):  # v2's line is "0::/path"
            path = cgroup_path
            break
    if path is None:
        return []
    for line in mounts.splitlines():
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        root, mountpoint = fields[3], Path(fields[4])
        v2 = kind[0] == "cgroup2" and not controller
        v1 = kind[0] == "cgroup" and controller in kind[2].split(",")
        if not (v1 or v2):
            continue
        # Without a cgroup namespace the mount's root is our own cgroup (docker on v1).
        relative = path[len(root):] if path.startswith(root) else ""
        folder = mountpoint / relative.lstrip("/")
        if folder.is_dir():
            return [folder, *[p for p in folder.parents if p.is_relative_to(mountpoint)]]
    return []


def _cgroup_cpu_limit(proc: Path = _PROC_SELF) -> float | None:
    """CPUs the cgroup quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    limits = []
    for folder in _cgroup_dirs("", proc):
        quota, _, period = (_read(folder / "cpu.max") or "max").partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(int(quota) / int(period))
    for folder in _cgroup_dirs("cpu", proc):
        v1_quota = _read(folder / "cpu.cfs_quota_us") or ""
        v1_period = _read(folder / "cpu.cfs_period_us") or ""
        if v1_quota.isdigit() and v1_period.isdigit() and int(v1_period) > 0:
            limits.append(int(v1_quota) / int(v1_period))  # "-1" (no quota) is not isdigit()
    return min(limits, default=None)


def _cgroup_mem_limit(proc: Path = _PROC_SELF) -> int | None:
    """Bytes the cgroup allows (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), or None."""
    limits = []
    for folder in _cgroup_dirs("", proc):
        value = _read(folder / "memory.max")
        if value and value.isdigit():
            limits.append(int(value))
    for folder in _cgroup_dirs("memory", proc):
        value = _read(folder / "memory.limit_in_bytes")
        if value and value.isdigit():
            limits.append(int(value))  # "no limit" reads as a huge number: min() with RAM
    return min(limits, default=None)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _visible(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) leaves to this host's replicas."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    wanted = {v.strip() for v in visible.split(",") if v.strip()}
    return [g for g in gpus if str(g.index) in wanted or g.uuid in wanted]


def detect_capacity(nvml: Nvml | None = None) -> Capacity:
    """This host's capacity: CPUs (affinity, cgroup quota), memory (RAM, cgroup limit), GPUs."""
    cpu = _usable_cpus() * 1000
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpu = min(cpu, max(1, int(quota * 1000)))
    mem = psutil.virtual_memory().total
    limit = _cgroup_mem_limit()
    if limit is not None:
        mem = min(mem, limit)
    if nvml is None:
        with Nvml() as own:
            gpus = _visible(own.gpus())
    else:
        gpus = _visible(nvml.gpus())
    return Capacity(cpu=cpu, mem=mem, gpus=tuple(g.index for g in gpus),
                    gpu_mem=tuple(g.memory_total for g in gpus))


def declared_capacity(cpu: str | None, mem: str | None, gpus: int | None,
                      detected: Capacity | None = None) -> Capacity:
    """Capacity from ``inferq scaler --cpu --mem --gpus``; what is not declared is detected.

    ``gpus=N`` lends the first N detected GPUs, or indices 0..N-1 where fewer are detected
    (how tests declare a GPU host without one).
    """
    if gpus is not None and gpus < 0:
        raise ValueError(f"--gpus must be 0 or more, got {gpus}")
    if detected is None:
        detected = detect_capacity()
    gpu_indices, gpu_mem = detected.gpus, detected.gpu_mem
    if gpus is not None:
        if gpus <= detected.gpu_count:
            gpu_indices, gpu_mem = detected.gpus[:gpus], detected.gpu_mem[:gpus]
        else:
            if detected.gpus:
                log.warning("declared %d GPUs, NVML reports %d", gpus, detected.gpu_count)
            gpu_indices, gpu_mem = tuple(range(gpus)), ()
    return Capacity(
        cpu=detected.cpu if cpu is None else parse_cpu(cpu),
        mem=detected.mem if mem is None else parse_mem(mem),
        gpus=gpu_indices,
        gpu_mem=gpu_mem,
    )


# -- GPUs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it; ``utilization`` is percent busy, None if not supported."""

    index: int
    name: str
    memory_total: int
    memory_used: int
    utilization: float | None
    uuid: str = ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Nvml:
    """NVML, initialised on first use; without a driver it reports no GPUs and never raises."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._nvml: Any = None
        self._state: bool | None = None  # None: not tried yet

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def available(self) -> bool:
        with self._lock:
            if self._state is None:
                self._state = self._init()
            return self._state

    def _init(self) -> bool:
        try:
            import pynvml
        except ImportError as exc:
            log.debug("NVML unavailable (no pynvml), so no GPUs: %s", exc)
            return False
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:  # e.g. LibraryNotFound, DriverNotLoaded
            log.debug("NVML unavailable, so no GPUs: %s", exc)
            return False
        self._nvml = pynvml
        return True

    def close(self) -> None:
        """Shut NVML down (a later call initialises it again)."""
        with self._lock:
            if self._state and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.debug("nvmlShutdown: %s", exc)
            self._nvml, self._state = None, None

    def _handles(self) -> list[tuple[int, Any]]:
        if not self.available:
            return []
        nvml = self._nvml
        try:
            return [(i, nvml.nvmlDeviceGetHandleByIndex(i))
                    for i in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError as exc:
            log.debug("NVML cannot list GPUs: %s", exc)
            return []

    def _utilization(self, handle: Any) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError:
            return None

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees, in NVML (PCI bus) order; [] without NVML."""
        with self._lock:
            infos = []
            for index, handle in self._handles():
                try:
                    name = _text(self._nvml.nvmlDeviceGetName(handle))
                    uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
                    memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                except self._nvml.NVMLError as exc:
                    log.debug("GPU %d unreadable: %s", index, exc)
                    continue
                infos.append(GpuInfo(index, name, int(memory.total), int(memory.used),
                                     self._utilization(handle), uuid))
            return infos

    def process_gpu_memory(self, pids: set[int] | list[int] | tuple[int, ...]) -> int:
        """Bytes of GPU memory the given processes hold, over all GPUs (0 without NVML)."""
        wanted, total = set(pids), 0
        with self._lock:
            for _, handle in self._handles():
                try:
                    processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except self._nvml.NVMLError:
                    continue
                total += sum(p.usedGpuMemory or 0 for p in processes if p.pid in wanted)
        return total

    def utilization(self, indices: tuple[int, ...] | list[int]) -> float | None:
        """Mean percent busy of the GPUs ``indices``; None when none of them reports it."""
        wanted = set(indices)
        with self._lock:
            values = [u for i, h in self._handles() if i in wanted
                      if (u := self._utilization(h)) is not None]
        return sum(values) / len(values) if values else None


# -- replica usage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """A replica's process tree: CPU since the previous sample (None on the first), RSS now."""

    cpu_millicores: float | None
    rss: int  # bytes, summed over the tree (pages shared after fork count once per process)


@dataclass
class _Tree:
    create_time: float
    members: dict[int, psutil.Process] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    at: float = 0.0


class ProcessTreeSampler:
    """CPU and RSS of process trees (a replica's main process and its pool children).

    CPU is the growth of the tree's CPU time between two samples over the wall time between
    them. Each member counts its own time plus that of children it reaped, so a child that
    exits and is reaped inside the tree keeps its time in the total.
    """

    def __init__(self) -> None:
        self._trees: dict[int, _Tree] = {}
        self._lock = threading.Lock()

    def forget(self, pid: int) -> None:
        with self._lock:
            self._trees.pop(pid, None)

    def sample(self, pid: int) -> Usage | None:
        """Usage of the tree rooted at ``pid``; None (and forgotten) when that process is gone."""
        now = time.monotonic()
        try:
            root = psutil.Process(pid)
            create_time = root.create_time()
            alive = root.status() != psutil.STATUS_ZOMBIE
            descendants = root.children(recursive=True)
        except psutil.Error:
            alive = False
        if not alive:
            self.forget(pid)
            return None
        with self._lock:
            previous = self._trees.get(pid)
            if previous is not None and previous.create_time != create_time:
                previous = None  # the PID was reused
            # Members seen before stay members while they run, even if reparented out.
            members = dict(previous.members) if previous else {}
            members.update({p.pid: p for p in (root, *descendants)})
            current = _Tree(create_time, at=now)
            rss = 0
            for member_pid, process in members.items():
                try:
                    if not process.is_running():  # gone, or its PID taken by another
                        continue
                    with process.oneshot():
                        times = process.cpu_times()
                        member_rss = process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess included
                    continue
                current.members[member_pid] = process
                current.cpu_seconds += (times.user + times.system
                                        + times.children_user + times.children_system)
                rss += member_rss
            self._trees[pid] = current
        if previous is None:
            return Usage(cpu_millicores=None, rss=rss)
        elapsed = now - previous.at
        # A member that left without being reaped inside the tree takes its time with it.
        grown = max(0.0, current.cpu_seconds - previous.cpu_seconds)
        return Usage(cpu_millicores=grown / elapsed * 1000 if elapsed > 0 else 0.0, rss=rss)
