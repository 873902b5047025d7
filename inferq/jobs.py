"""Batch jobs: every sample of a data set predicted through an API's queue.

A job is a record in Redis (``Registry.job_key``), so it outlives whoever submitted it::

    queued -> running -> succeeded | completed with failures | failed | stopped
       ^                                                          |        |
       +---------------- resume (a failed or stopped job) --------+--------+

Nobody's terminal drives it: any host's scaler (:mod:`inferq.scaler.jobs`) claims a job that
wants a driver, with a lease it renews, and runs :mod:`inferq.jobdriver` for it. A driver that
dies (SIGKILL, a host lost) stops renewing; its lease lapses and a scaler starts another,
which goes on from the job's checkpoint. A job whose input or output is a local path is
driven only on the machine it was submitted from.

:class:`Jobs` is the records' one home (their fields and every transition, each one atomic
in Redis); :class:`Job` is the handle ``Client.batch`` returns.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferq.errors import JobError
from inferq.registry import Registry
from inferq.workers.messages import queue_name

if TYPE_CHECKING:
    from inferq.client import Client

QUEUED, RUNNING, STOPPED, FAILED = "queued", "running", "stopped", "failed"
SUCCEEDED, WITH_FAILURES = "succeeded", "completed with failures"
ENDED = (SUCCEEDED, WITH_FAILURES, FAILED, STOPPED)
LEASE_SECONDS = 10.0  # a driver that stops renewing loses its job after this
LISTED = 100  # `inferq batch get` shows the newest this many jobs


@dataclass(frozen=True)
class JobRecord:
    """A job as Redis holds it."""

    id: str
    api: str
    input: str
    output: str
    dead_letter: str
    batch_size: int
    window: int
    machine: str  # the machine whose files it reads or writes; "" where any host may drive it
    status: str
    total: int | None
    done: int
    failed: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    error: str
    stop: bool
    checkpoint: int  # samples written to the output
    chunk: int  # the number of the chunk that comes next after the checkpoint
    position: str  # where reading goes on (inferq.jobfiles.Position JSON)
    writers: dict[str, Any]  # the output's and the dead letter's state at the checkpoint
    run_started_at: float | None
    run_first: int  # samples written when this run began (for its rate)
    driver: str

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[bytes, bytes]) -> JobRecord:
        data = {k.decode(): v.decode() for k, v in raw.items()}

        def number(name: str, kind: type = float) -> Any:
            return kind(data[name]) if data.get(name) else None

        return cls(
            id=job_id, api=data["api"], input=data["input"], output=data["output"],
            dead_letter=data["dead_letter"], batch_size=int(data["batch_size"]),
            window=int(data["window"]), machine=data.get("machine", ""),
            status=data["status"], total=number("total", int), done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)), created_at=float(data["created_at"]),
            started_at=number("started_at"), ended_at=number("ended_at"),
            error=data.get("error", ""), stop=data.get("stop") == "1",
            checkpoint=int(data.get("checkpoint", 0)), chunk=int(data.get("chunk", 0)),
            position=data.get("position", ""), writers=json.loads(data.get("writers") or "{}"),
            run_started_at=number("run_started_at"), run_first=int(data.get("run_first", 0)),
            driver=data.get("driver", ""),
        )

    @property
    def rate(self) -> float | None:
        """Samples per second of the current (or last) run."""
        if self.run_started_at is None:
            return None
        end = self.ended_at if self.ended_at and self.ended_at >= self.run_started_at \
            else time.time()
        elapsed = end - self.run_started_at
        written = self.done + self.failed - self.run_first
        return written / elapsed if elapsed > 0 and written > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """What ``inferq batch get`` and ``Job.status()`` show."""
        return {
            "id": self.id, "api": self.api, "status": self.status, "done": self.done,
            "failed": self.failed, "total": self.total, "rate": self.rate,
            "created_at": self.created_at, "started_at": self.started_at,
            "ended_at": self.ended_at, "input": self.input, "output": self.output,
            "dead_letter": self.dead_letter if self.failed else None,
            "error": self.error or None,
            "stopping": self.stop and self.status not in ENDED,
            "driven_on": self.machine or None,
        }


class Jobs:
    """The batch jobs in Redis."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.redis = registry.redis
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._stop = self.redis.register_script(_STOP)
        self._resume = self.redis.register_script(_RESUME)
        self._commit = self.redis.register_script(_COMMIT)
        self._send = self.redis.register_script(_SEND)
        self._finish = self.redis.register_script(_FINISH)

    # -- submitting and controlling -----------------------------------------------------------

    def create(self, *, api: str, input: str, output: str, dead_letter: str, batch_size: int,
               window: int, machine: str) -> str:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(Registry.job_key(job_id), mapping={
            "api": api, "input": input, "output": output, "dead_letter": dead_letter,
            "batch_size": batch_size, "window": window, "machine": machine,
            "status": QUEUED, "created_at": now, "done": 0, "failed": 0, "checkpoint": 0,
            "chunk": 0,
        })
        pipe.zadd(Registry.jobs_key(), {job_id: now})
        pipe.sadd(Registry.jobs_key("active"), job_id)
        pipe.execute()
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(Registry.job_key(job_id))
        return JobRecord.from_hash(job_id, raw) if raw else None

    def require(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise JobError(f"no batch job {job_id!r} (see `inferq batch get`)")
        return record

    def list(self, limit: int = LISTED) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        return self._records(
            [i.decode() for i in self.redis.zrevrange(Registry.jobs_key(), 0, limit - 1)])

    def active(self) -> list[JobRecord]:
        """The queued and running jobs, however old, oldest first."""
        return sorted(self._records(self.wanting_driver()), key=lambda j: j.created_at)

    def _records(self, ids: list[str]) -> list[JobRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(Registry.job_key(job_id))
        return [JobRecord.from_hash(job_id, raw)
                for job_id, raw in zip(ids, pipe.execute()) if raw]

    def stop(self, job_id: str) -> str:
        """Stop a job: a queued one at once, a running one at its driver's next step (what was
        predicted is kept). Returns the job's status after the request."""
        self.require(job_id)
        return self._stop(keys=[Registry.job_key(job_id), Registry.jobs_key("active")],
                          args=[time.time()]).decode()

    def resume(self, job_id: str) -> str:
        """Queue a stopped or failed job again; it goes on from its checkpoint."""
        record = self.require(job_id)
        outcome = self._resume(keys=[Registry.job_key(job_id), Registry.jobs_key("active")])
        if outcome != 1:
            raise JobError(f"job {job_id} is {record.status}: only a stopped or failed job "
                           "can be resumed")
        return QUEUED

    # -- drivers ------------------------------------------------------------------------------

    def wanting_driver(self) -> list[str]:
        return sorted(i.decode() for i in self.redis.smembers(Registry.jobs_key("active")))

    def claim(self, job_id: str, token: str, machine: str) -> bool:
        """Take the job's lease for a new driver, if it wants one that may run here."""
        return self._claim(keys=[Registry.job_key(job_id), Registry.job_key(job_id, "driver"),
                                 Registry.jobs_key("active")],
                           args=[token, int(LEASE_SECONDS * 1000), machine]) == 1

    def renew(self, job_id: str, token: str) -> bool:
        """Keep the lease; False when it was lost (another driver has the job)."""
        return self._renew(keys=[Registry.job_key(job_id, "driver")],
                           args=[token, int(LEASE_SECONDS * 1000)]) == 1

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[Registry.job_key(job_id, "driver")], args=[token])

    def start_run(self, job_id: str, driver: str) -> None:
        record = self.require(job_id)
        now = time.time()
        fields = {"status": RUNNING, "run_started_at": now, "driver": driver,
                  "run_first": record.done + record.failed}
        if record.started_at is None:
            fields["started_at"] = now
        self.redis.hset(Registry.job_key(job_id), mapping=fields)

    def set_total(self, job_id: str, total: int) -> None:
        self.redis.hset(Registry.job_key(job_id), "total", total)

    def sent_chunks(self, job_id: str) -> dict[int, tuple[float, int]]:
        """The chunks queued and not yet written: number -> (when, how many samples)."""
        raw = self.redis.hgetall(Registry.job_key(job_id, "chunks"))
        sent = {}
        for number, value in raw.items():
            when, _, size = value.decode().partition(":")
            sent[int(number)] = (float(when), int(size))
        return sent

    def answers(self, job_id: str, chunks: list[int]) -> list[dict[str, Any] | None]:
        if not chunks:
            return []
        raw = self.redis.hmget(Registry.job_key(job_id, "results"), chunks)
        return [json.loads(r) if r is not None else None for r in raw]

    def wait_answered(self, job_id: str, timeout: float) -> list[int]:
        """Wait up to ``timeout`` for replicas to answer some of the job's chunks; their
        numbers (those answered since the last call)."""
        return [int(n) for n in self.registry.pop_all(Registry.job_key(job_id, "done"),
                                                      timeout)]

    def send(self, job_id: str, token: str, *, api: str, message: str, chunk: int, size: int,
             extra: int, changes: int) -> str:
        """Queue a chunk unless the API's queue already holds a message per two replicas (at
        least one; live traffic goes first), the APIs changed, or the lease was lost:
        "queued", "busy", "stale" or "lost"."""
        queue = queue_name(api)
        code = self._send(
            keys=[Registry.changes_key(), queue, Registry.extra_key(queue),
                  Registry.replicas_key(api),
                  Registry.job_key(job_id, "chunks"), Registry.job_key(job_id, "driver")],
            args=[changes, message, extra, chunk, f"{time.time()}:{size}", token])
        return {1: "queued", 0: "busy", -1: "stale", -2: "lost"}[int(code)]

    def unsend(self, job_id: str, chunk: int) -> None:
        """Forget that a chunk was sent (it was withdrawn before any replica took it)."""
        self.redis.hdel(Registry.job_key(job_id, "chunks"), chunk)

    def commit(self, job_id: str, token: str, *, api: str, checkpoint: int, chunk: int,
               position: str, writers: dict[str, Any], done: int, failed: int,
               chunks: list[int]) -> bool:
        """Record a checkpoint: ``done`` and ``failed`` more samples written, up to sample
        ``checkpoint`` and chunk ``chunk``; forget those chunks' answers. False (nothing
        recorded) when the lease was lost."""
        return self._commit(
            keys=[Registry.job_key(job_id), Registry.job_key(job_id, "driver"),
                  Registry.job_key(job_id, "chunks"), Registry.job_key(job_id, "results"),
                  Registry.stats_key(api)],
            args=[token, checkpoint, chunk, position, json.dumps(writers), done, failed,
                  *chunks]) == 1

    def finish(self, job_id: str, token: str, status: str, error: str = "") -> None:
        """End the job's run: ``status`` (an ended one), and for an error its message."""
        self._finish(keys=[Registry.job_key(job_id), Registry.job_key(job_id, "driver"),
                           Registry.jobs_key("active"), Registry.job_key(job_id, "chunks"),
                           Registry.job_key(job_id, "results"), Registry.job_key(job_id, "done")],
                     args=[token, status, error, time.time(),
                           1 if status in (SUCCEEDED, WITH_FAILURES) else 0])


class Job:
    """A batch job, as ``Client.batch`` returns it."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> dict[str, Any]:
        """The job's status, counts (done, failed, total), rate, times, output and error."""
        return self.client.jobs.require(self.id).to_dict()

    def stop(self) -> str:
        return self.client.jobs.stop(self.id)

    def resume(self) -> Job:
        self.client.jobs.resume(self.id)
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
                if state["status"] in ENDED:
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


def this_machine() -> str:
    """The machine whose local files a job may name (jobs on local paths run only here)."""
    return socket.gethostname()


def _show(bar: Any, state: dict[str, Any]) -> Any:
    if bar is None:
        from tqdm import tqdm

        bar = tqdm(total=state["total"], desc=f"{state['api']} {state['id']}", unit="sample")
    if state["total"] is not None and bar.total != state["total"]:
        bar.total = state["total"]
    bar.n = state["done"] + state["failed"]
    bar.set_postfix_str(state["status"] + (f", {state['failed']} failed" if state["failed"]
                                           else ""), refresh=False)
    bar.refresh()
    return bar


# KEYS: job, lease, active; ARGV: token, lease ms, this machine.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  redis.call('SREM', KEYS[3], string.match(KEYS[1], '[^:]+$'))
  return 0
end
local machine = redis.call('HGET', KEYS[1], 'machine')
if machine and machine ~= '' and machine ~= ARGV[3] then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# KEYS: lease; ARGV: token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# KEYS: job, active; ARGV: now. Returns the status after it.
_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'stopped', 'ended_at', ARGV[1])
  redis.call('SREM', KEYS[2], string.match(KEYS[1], '[^:]+$'))
  return 'stopped'
end
if status == 'running' then redis.call('HSET', KEYS[1], 'stop', '1') end
return status
"""
# KEYS: job, active.
_RESUME = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'stopped' and status ~= 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'stop', '0', 'error', '')
redis.call('HDEL', KEYS[1], 'ended_at')
redis.call('SADD', KEYS[2], string.match(KEYS[1], '[^:]+$'))
return 1
"""
# KEYS: job, lease, chunks, results, the API's stats; ARGV: token, checkpoint, chunk,
# position, writers, done, failed, then the chunk numbers written.
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'checkpoint', ARGV[2], 'chunk', ARGV[3], 'position', ARGV[4],
           'writers', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'done', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[7])
redis.call('HINCRBY', KEYS[5], 'job_samples', ARGV[6])
redis.call('HINCRBY', KEYS[5], 'job_failed', ARGV[7])
for i = 8, #ARGV do
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return 1
"""
# KEYS: changes, queue, its extra counter, the API's replicas, the job's chunks, lease;
# ARGV: changes, message, extra samples, chunk, "now:samples in the chunk", token.
_SEND = """
if redis.call('GET', KEYS[6]) ~= ARGV[6] then return -2 end
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return -1 end
local room = math.max(1, math.ceil(redis.call('HLEN', KEYS[4]) / 2))
if redis.call('LLEN', KEYS[2]) >= room then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
local extra = tonumber(ARGV[3])
if extra > 0 then redis.call('INCRBY', KEYS[3], extra) end
redis.call('HSET', KEYS[5], ARGV[4], ARGV[5])
return 1
"""
# KEYS: job, lease, active, chunks, results, done; ARGV: token, status, error, now, whether
# the job's leftovers go (it succeeded: a stopped or failed job keeps them to resume).
_FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'error', ARGV[3], 'ended_at', ARGV[4],
           'stop', '0')
redis.call('SREM', KEYS[3], string.match(KEYS[1], '[^:]+$'))
redis.call('DEL', KEYS[2], KEYS[6])
if ARGV[5] == '1' then redis.call('DEL', KEYS[4], KEYS[5]) end
return 1
"""
