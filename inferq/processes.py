"""Child processes that never outlive the inferq process that started them.

``inferq up`` starts Redis, the gateway and the scaler; the scaler starts replicas. Each child
is started in its own process group (so a terminal's Ctrl-C reaches only the parent, which
then stops its children in order) and, on Linux, with a parent-death signal, so even a
SIGKILLed parent leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _own_group_and_die_with_parent() -> None:  # runs in the child between fork and exec
    os.setpgid(0, 0)
    die_with_parent()


def spawn(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout=None,
    stderr=None,
    cwd: str | None = None,
    own_group: bool = True,
) -> subprocess.Popen:
    """Start ``args`` as a child that dies with this process, in a process group of its own
    unless ``own_group`` is False (then a signal to this process's group reaches it too)."""
    return subprocess.Popen(
        list(args),
        env=env,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        # Only prctl and setpgid run there (async-signal-safe enough); no lock is taken.
        preexec_fn=_own_group_and_die_with_parent if own_group else die_with_parent,
    )


def stop(process: subprocess.Popen, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Ask ``process`` to stop with ``sig``; SIGKILL it after ``timeout``. Return its exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_until(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:.1f}s")
        time.sleep(interval)
