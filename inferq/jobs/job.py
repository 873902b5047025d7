"""The handle of one batch job, as ``Client.batch`` and ``Client.job`` return it."""

from __future__ import annotations

import time
from typing import Any

from inferq.jobs.records import Jobs, JobStatus


class Job:
    """A batch job: its status, and stop, resume and wait."""

    def __init__(self, jobs: Jobs, job_id: str) -> None:
        self.jobs = jobs
        self.id = job_id

    def status(self) -> dict[str, Any]:
        """The job's status, counts (done, failed, total), rate, times, output and error."""
        return self.jobs.require(self.id).to_dict()

    def stop(self) -> JobStatus:
        """Stop the job (what was predicted is kept); its status after the request."""
        return self.jobs.stop(self.id)

    def resume(self) -> Job:
        """Queue a stopped or failed job again; it goes on from its checkpoint."""
        self.jobs.resume(self.id)
        return self

    def wait(self, *, progress: bool = False, timeout: float | None = None,
             poll: float = 0.5) -> dict[str, Any]:
        """Wait until the job ends (or ``timeout`` seconds); return its status. With
        ``progress``, a progress bar of the samples written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            while True:
                state = self.status()
                if progress:
                    bar = _show(bar, state)
                if JobStatus(state["status"]).ended:
                    return state
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} is still {state['status']} after "
                                       f"{timeout:g}s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        return f"<Job {self.id}>"


def _show(bar: Any, state: dict[str, Any]) -> Any:
    """The progress bar of a job: samples written and the job's own rate (tqdm's would count
    from when this process started watching, not from when the job did)."""
    if bar is None:
        from tqdm import tqdm

        bar = tqdm(total=state["total"], desc=f"{state['api']} {state['id']}", unit="sample",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    if state["total"] is not None and bar.total != state["total"]:
        bar.total = state["total"]
    bar.n = state["done"] + state["failed"]
    rate = f", {state['rate']:.0f} samples/s" if state["rate"] else ""
    failed = f", {state['failed']} failed" if state["failed"] else ""
    bar.set_postfix_str(f"{state['status']}{rate}{failed}", refresh=False)
    bar.refresh()
    return bar
