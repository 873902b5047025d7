"""inferq.scaler.host: capacity detection and declaration, NVML without a driver, and the sampler
measured on real process trees (busy, idle, grandchildren, children that exit)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from inferq.processes import spawn, stop, wait_until
from inferq.scaler.host import (
    Capacity,
    Nvml,
    ProcessTreeSampler,
    Usage,
    _cgroup_cpu_limit,
    _cgroup_mem_limit,
    declared_capacity,
    detect_capacity,
)
from inferq.stack import host_name

GiB = 1024**3
MiB = 1024**2

# depth > 0: start a child one level shallower, then wait for it (REAP=1) or not, then idle.
# depth 0: mark itself ready (a file named by its PID), then do MODE.
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path

    depth, mode, ready = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    deadline = time.monotonic() + 110  # never outlive a test run, even if orphaned

    def mark():
        (ready / str(os.getpid())).touch()

    if depth > 0:
        child = subprocess.Popen([sys.executable, __file__, str(depth - 1), mode, str(ready)])
        mark()
        if os.environ.get("REAP", "1") == "1":
            child.wait()
        time.sleep(max(0, deadline - time.monotonic()))
    elif mode == "spin":
        mark()
        while time.monotonic() < deadline:
            pass
    elif mode == "spin-until-stop":
        mark()
        while time.monotonic() < deadline and not (ready / "stop").exists():
            for _ in range(10000):
                pass
    elif mode == "alloc":
        data = b"x" * (100 * 1024 * 1024)  # written, so resident
        mark()
        time.sleep(max(0, deadline - time.monotonic()))
    else:
        mark()
        time.sleep(max(0, deadline - time.monotonic()))
    """
)


class Tree:
    """A process tree started from TREE: ``pids`` lists its members, root first."""

    def __init__(self, tmp: Path, depth: int, mode: str, reap: bool = True) -> None:
        self.ready = tmp / f"ready-{mode}-{depth}-{time.monotonic_ns()}"
        self.ready.mkdir()
        script = tmp / "tree.py"
        script.write_text(TREE)
        self.process = spawn(
            [sys.executable, str(script), str(depth), mode, str(self.ready)],
            env={**os.environ, "REAP": "1" if reap else "0"},
        )
        self.pids = wait_until(lambda: self._ready_pids(depth + 1), 30, what="tree ready")

    def _ready_pids(self, count: int) -> list[int] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"tree root exited with {self.process.returncode}")
        pids = [int(p.name) for p in self.ready.iterdir() if p.name.isdigit()]
        if len(pids) < count:
            return None
        return sorted(pids, key=lambda pid: pid != self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop every member by PID: children of the root do not die with it."""
        try:
            members = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            members = []
        stop(self.process, timeout=5)
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()  # psutil checks the PID still names the same process
        psutil.wait_procs(members, timeout=5)


@pytest.fixture
def tree(tmp_path):
    trees: list[Tree] = []

    def start(depth: int, mode: str, reap: bool = True) -> Tree:
        trees.append(Tree(tmp_path, depth, mode, reap))
        return trees[-1]

    yield start
    for started in trees:
        started.stop()


def measure(sampler: ProcessTreeSampler, *pids: int, window: float = 0.5) -> list[Usage]:
    """One sample of each tree over the same window of ``window`` seconds (CPU time is counted
    in 10 ms ticks: a shorter window would be mostly rounding)."""
    for pid in pids:
        sampler.forget(pid)
        assert sampler.sample(pid).cpu_millicores is None  # the baseline
    start = time.monotonic()
    wait_until(lambda: time.monotonic() - start >= window, window + 5, what="window passed")
    return [sampler.sample(pid) for pid in pids]


def measure_busy(sampler: ProcessTreeSampler, pid: int, above: float) -> float:
    """Measure ``pid`` until a window shows more than ``above`` millicores; return that value."""

    def busy():
        [usage] = measure(sampler, pid)
        return usage.cpu_millicores if usage.cpu_millicores > above else None

    return wait_until(busy, 20, interval=0, what=f"more than {above}m of CPU")


# -- capacity ---------------------------------------------------------------------------------


def test_detect_capacity_counts_usable_cpus_memory_and_no_gpus_without_nvml():
    capacity = detect_capacity()
    cpus = len(os.sched_getaffinity(0)) * 1000
    quota = _cgroup_cpu_limit()
    assert capacity.cpu == (cpus if quota is None else min(cpus, max(1, int(quota * 1000))))
    assert 0 < capacity.mem <= psutil.virtual_memory().total
    with Nvml() as nvml:
        if nvml.available:
            assert capacity.gpu_count == len(capacity.gpu_mem) > 0
        else:
            assert capacity.gpus == () and capacity.gpu_mem == ()
    assert capacity.describe().startswith("cpu ")


def _fake_proc(tmp: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A /proc/self with ``cgroup`` and a mountinfo of (root, mountpoint, fstype, options)."""
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(
        f"{30 + i} 23 0:{26 + i} {root} {point} rw,nosuid shared:9 - {fstype} cgroup {options}\n"
        for i, (root, point, fstype, options) in enumerate(mounts)
    ))
    return proc


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_limits_are_the_smallest_along_the_hierarchy(tmp_path):
    cg = tmp_path / "cg"
    _write(cg / "user.slice" / "app" / "cpu.max", "150000 100000")
    _write(cg / "user.slice" / "app" / "memory.max", "max")
    _write(cg / "user.slice" / "cpu.max", "max 100000")
    _write(cg / "user.slice" / "memory.max", str(GiB))
    proc = _fake_proc(tmp_path, "0::/user.slice/app\n", [("/", str(cg), "cgroup2", "rw")])
    assert _cgroup_cpu_limit(proc) == 1.5
    assert _cgroup_mem_limit(proc) == GiB


def test_cgroup_v1_quota_and_memory_limit_are_read(tmp_path):
    cpu, mem = tmp_path / "cpu", tmp_path / "memory"
    _write(cpu / "cpu.cfs_quota_us", "50000")  # mounted at the container's own cgroup
    _write(cpu / "cpu.cfs_period_us", "100000")
    _write(mem / "docker" / "abc" / "memory.limit_in_bytes", str(512 * MiB))
    _write(mem / "memory.limit_in_bytes", "9223372036854771712")
    proc = _fake_proc(
        tmp_path,
        "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
        [("/docker/abc", str(cpu), "cgroup", "rw,cpu,cpuacct"),
         ("/", str(mem), "cgroup", "rw,memory")],
    )
    assert _cgroup_cpu_limit(proc) == 0.5
    assert _cgroup_mem_limit(proc) == 512 * MiB


def test_no_cgroup_quota_means_no_limit(tmp_path):
    cpu = tmp_path / "cpu"
    _write(cpu / "cpu.cfs_quota_us", "-1")
    _write(cpu / "cpu.cfs_period_us", "100000")
    proc = _fake_proc(tmp_path, "3:cpu,cpuacct:/\n", [("/", str(cpu), "cgroup", "rw,cpu")])
    assert _cgroup_cpu_limit(proc) is None
    assert _cgroup_mem_limit(proc) is None
    assert _cgroup_cpu_limit(tmp_path / "missing") is None


def test_declared_capacity_overrides_what_is_declared_and_keeps_the_rest():
    detected = Capacity(cpu=4000, mem=8 * GiB)
    assert declared_capacity(None, None, None, detected) == detected
    assert declared_capacity("1500m", "2Gi", 2, detected) == Capacity(1500, 2 * GiB, (0, 1))
    assert declared_capacity("2", None, None, detected) == Capacity(2000, 8 * GiB)
    assert declared_capacity(None, "512Mi", 0, detected) == Capacity(4000, 512 * MiB)
    assert declared_capacity(None, None, 3, detected).gpus == (0, 1, 2)


def test_declared_gpus_take_the_detected_ones_first():
    detected = Capacity(cpu=4000, mem=8 * GiB, gpus=(2, 3), gpu_mem=(80 * GiB, 40 * GiB))
    assert declared_capacity(None, None, 1, detected) == Capacity(4000, 8 * GiB, (2,), (80 * GiB,))
    assert declared_capacity(None, None, None, detected) == detected


def test_declared_capacity_detects_when_not_given_and_rejects_nonsense():
    capacity = declared_capacity(None, None, 2)
    assert capacity.cpu == detect_capacity().cpu and capacity.gpu_count == 2
    with pytest.raises(ValueError):
        declared_capacity("2x", None, None, Capacity(1000, GiB))
    with pytest.raises(ValueError):
        declared_capacity(None, None, -1, Capacity(1000, GiB))


def test_capacity_travels_as_json_and_describes_itself():
    capacity = Capacity(cpu=2500, mem=8 * GiB, gpus=(0, 1), gpu_mem=(16 * GiB, 16 * GiB))
    assert Capacity.from_dict(json.loads(json.dumps(capacity.to_dict()))) == capacity
    assert Capacity.from_dict({"cpu": 1000, "mem": GiB}) == Capacity(1000, GiB)
    assert capacity.describe() == "cpu 2500m, mem 8Gi, gpus 2 (0,1)"
    odd = Capacity(cpu=2000, mem=25_276_514_304)
    assert odd.describe() == "cpu 2, mem 23.5Gi, gpus 0"


def test_hostname_can_be_set_by_environment(monkeypatch):
    monkeypatch.delenv("INFERQ_HOST_NAME", raising=False)
    assert host_name()
    monkeypatch.setenv("INFERQ_HOST_NAME", "gpu-7")
    assert host_name() == "gpu-7"


# -- NVML -------------------------------------------------------------------------------------


def test_nvml_without_a_driver_reports_nothing_and_never_raises():
    nvml = Nvml()
    if nvml.available:
        pytest.skip("this host has an NVIDIA driver")
    errors: list[BaseException] = []

    def use():
        try:
            assert nvml.available is False
            assert nvml.gpus() == []
            assert nvml.utilization([0, 1]) is None
            assert nvml.process_gpu_memory([os.getpid()]) == 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    with nvml:
        assert nvml.gpus() == []
    nvml.close()  # twice is fine
    assert detect_capacity(nvml).gpus == ()


def test_nvml_reports_gpus_consistently_where_there_is_a_driver():
    with Nvml() as nvml:
        if not nvml.available:
            pytest.skip("no NVIDIA driver on this host")
        gpus = nvml.gpus()
        assert [g.index for g in gpus] == list(range(len(gpus)))
        assert all(g.memory_total >= g.memory_used >= 0 and g.name for g in gpus)
        assert nvml.process_gpu_memory([os.getpid()]) >= 0


# -- replica usage ----------------------------------------------------------------------------


def test_busy_process_measures_about_one_core_and_idle_one_near_zero(tree):
    busy, idle = tree(0, "spin"), tree(0, "sleep")
    sampler = ProcessTreeSampler()
    assert 300 < measure_busy(sampler, busy.pid, above=300) < 1300  # one thread, one core
    busy_usage, idle_usage = measure(sampler, busy.pid, idle.pid)
    assert busy_usage.cpu_millicores > 300
    assert 0 <= idle_usage.cpu_millicores < 100
    assert idle_usage.rss > 0


def test_grandchild_spinning_counts_for_its_tree(tree):
    spinning = tree(2, "spin")
    assert len(spinning.pids) == 3
    assert measure_busy(ProcessTreeSampler(), spinning.pid, above=300) < 1300


def test_rss_of_the_tree_includes_memory_a_process_allocated(tree):
    single, nested = tree(0, "alloc"), tree(1, "alloc")
    sampler = ProcessTreeSampler()
    assert sampler.sample(single.pid).rss >= 90e6
    parent_alone = psutil.Process(nested.pid).memory_info().rss
    assert sampler.sample(nested.pid).rss >= parent_alone + 90e6


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_child_that_exits_between_samples_does_not_break_sampling(tree, reap):
    parent = tree(1, "spin-until-stop", reap=reap)
    child = psutil.Process(parent.pids[1])
    sampler = ProcessTreeSampler()
    assert sampler.sample(parent.pid).cpu_millicores is None
    # CPU time moves in 10 ms ticks: let the child burn well over one after the baseline,
    # or a reaped child's time may not show (it did not, 2 runs in 5).
    baseline = sum(child.cpu_times()[:2])
    wait_until(lambda: sum(child.cpu_times()[:2]) >= baseline + 0.1, 20,
               what="the child spinning 100 ms past the baseline")
    (parent.ready / "stop").touch()

    def exited() -> bool:
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(exited, 20, what="child exited")
    if reap:
        wait_until(lambda: not psutil.pid_exists(child.pid), 20, what="child reaped")
    usage = sampler.sample(parent.pid)
    assert usage is not None and usage.cpu_millicores >= 0
    if reap:  # its CPU time went to the parent that reaped it
        assert usage.cpu_millicores > 0
    again = sampler.sample(parent.pid)
    assert again is not None and again.cpu_millicores >= 0


def test_gone_process_samples_as_none_and_forget_restarts_the_baseline(tree):
    idle = tree(0, "sleep")
    sampler = ProcessTreeSampler()
    assert sampler.sample(idle.pid).cpu_millicores is None
    assert sampler.sample(idle.pid).cpu_millicores is not None
    sampler.forget(idle.pid)
    assert sampler.sample(idle.pid).cpu_millicores is None
    idle.stop()
    assert sampler.sample(idle.pid) is None
