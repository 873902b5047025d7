"""The batch jobs a host drives, each a ``python -m inferq.jobs.driver`` child process.

Every scaler looks for jobs that want a driver at each tick and claims one with a lease (see
:mod:`inferq.jobs.records`), so a job is driven by exactly one host at a time, on any host for S3
jobs and on the submitting machine for jobs on local files. A driver that exits before its
job ended (killed, out of memory, the broker away) gives its lease back here and its job is
claimed again at the next tick; a host that vanishes leaves a lease that lapses, and another
host's scaler goes on with the job from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

from inferq.jobs.records import Jobs, this_machine
from inferq.processes import spawn, stop
from inferq.registry import Registry

log = logging.getLogger("inferq.scaler")  # it runs in the scaler

MAX_DRIVERS = 4  # jobs one host drives at once; more wait their turn


@dataclass
class _Driving:
    process: subprocess.Popen
    token: str


class JobRunner:
    """Starts and reaps this host's job drivers."""

    def __init__(self, registry: Registry, broker_url: str) -> None:
        self.jobs = Jobs(registry)
        self.broker_url = broker_url
        self.machine = this_machine()
        self.driving: dict[str, _Driving] = {}

    def tick(self) -> None:
        for job_id, driving in list(self.driving.items()):
            code = driving.process.poll()
            if code is None:
                continue
            del self.driving[job_id]
            self.jobs.release(job_id, driving.token)  # a job that did not end is claimed again
            if code != 0:
                log.warning("job %s: its driver (pid %d) exited with %d; it goes on from its "
                            "checkpoint", job_id, driving.process.pid, code)
        for job_id in self.jobs.wanting_driver():
            if len(self.driving) >= MAX_DRIVERS:
                break
            if job_id in self.driving:
                continue
            token = uuid.uuid4().hex
            if self.jobs.claim(job_id, token, self.machine):
                self.driving[job_id] = _Driving(self._start(job_id, token), token)

    def pids(self) -> dict[str, int]:
        """The running drivers' process ids by job."""
        return {job_id: d.process.pid for job_id, d in self.driving.items()}

    def shutdown(self) -> None:
        """Stop the drivers; their jobs stay running and another host goes on with them."""
        for job_id, driving in self.driving.items():
            stop(driving.process, timeout=5)
            self.jobs.release(job_id, driving.token)
        self.driving.clear()

    def _start(self, job_id: str, token: str) -> subprocess.Popen:
        log.info("job %s: driving it from here", job_id)
        env = {**os.environ, "INFERQ_BROKER_URL": self.broker_url, "PYTHONUNBUFFERED": "1"}
        return spawn([sys.executable, "-P", "-m", "inferq.jobs.driver", job_id, token], env=env)
