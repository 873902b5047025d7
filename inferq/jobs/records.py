"""A batch job's record in Redis, and every transition of it, each one atomic (a Lua script).

The record outlives whoever submitted the job and whichever driver runs it: the driver
records a checkpoint (samples written, where the input goes on, the outputs' state) that the
next driver goes on from.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from inferq import keys
from inferq.errors import JobError
from inferq.jobs import files
from inferq.messages import ChunkAnswer
from inferq.registry import Registry
from inferq.registry.queues import BACKGROUND_ADMIT
from inferq.registry.store import Leases

LEASE_SECONDS = 10.0  # a driver that stops renewing loses its job after this
LISTED = 100  # `inferq batch get` shows the newest this many jobs


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    WITH_FAILURES = "completed with failures"
    FAILED = "failed"  # its input or output could not be read or written, or its API is gone
    STOPPED = "stopped"

    @property
    def ended(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class ChunkSend(StrEnum):
    """What became of a chunk offered to the API's queue (:meth:`Jobs.send`)."""

    QUEUED = "queued"
    BUSY = "busy"  # the queue holds a message per two replicas already: live traffic first
    STALE = "stale"  # something was deployed or deleted: is the API still there?
    LOST = "lost"  # another driver has the job's lease


_SENDS = {1: ChunkSend.QUEUED, 0: ChunkSend.BUSY, -1: ChunkSend.STALE, -2: ChunkSend.LOST}


@dataclass(frozen=True)
class Checkpoint:
    """What a driver wrote since its last checkpoint, and where the job now stands."""

    written: int  # samples written to the output, in all
    chunk: int  # the number of the chunk that comes next
    position: str  # where reading goes on (``files.Position`` JSON)
    writers: dict[str, Any]  # the output's and the dead letter's state
    done: int  # samples answered since the last checkpoint
    failed: int  # ... of which failed
    chunks: list[int]  # the chunks written since the last checkpoint


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
    status: JobStatus
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
    position: str  # where reading goes on (``files.Position`` JSON)
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
            status=JobStatus(data["status"]), total=number("total", int),
            done=int(data.get("done", 0)), failed=int(data.get("failed", 0)),
            created_at=float(data["created_at"]),
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
            "id": self.id, "api": self.api, "status": self.status.value, "done": self.done,
            "failed": self.failed, "total": self.total, "rate": self.rate,
            "created_at": self.created_at, "started_at": self.started_at,
            "ended_at": self.ended_at, "input": self.input, "output": self.output,
            "dead_letter": self.dead_letter if self.failed else None,
            "error": self.error or None,
            "stopping": self.stop and not self.status.ended,
            "driven_on": self.machine or None,
        }


class Jobs:
    """The batch jobs in Redis."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.redis = registry.redis
        self._claim = self.redis.register_script(_CLAIM)
        self._leases = Leases(self.redis, LEASE_SECONDS)  # a job's claim is _CLAIM's
        self._stop = self.redis.register_script(_STOP)
        self._resume = self.redis.register_script(_RESUME)
        self._commit = self.redis.register_script(_COMMIT)
        self._send = self.redis.register_script(_SEND)
        self._finish = self.redis.register_script(_FINISH)

    # -- submitting and controlling -----------------------------------------------------------

    def submit(self, api: str, input: str | os.PathLike, output: str | os.PathLike | None, *,
               batch_size: int, window: int) -> str:
        """Check a job's input and outputs, record it ``queued`` and return its id (see
        ``Client.batch``); :class:`JobError` for an input or output it cannot use."""
        source_uri = files.resolve(input)
        source = files.open_source(source_uri)
        output_uri = files.resolve(output) if output else files.default_output(source_uri)
        files.check_output(output_uri, source)
        dead_letter = files.dead_letter_of(output_uri)
        files.check_output(dead_letter, source)
        local = not (source_uri.startswith("s3://") and output_uri.startswith("s3://"))
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping={
            "api": api, "input": source_uri, "output": output_uri, "dead_letter": dead_letter,
            "batch_size": batch_size, "window": window,
            "machine": this_machine() if local else "",
            "status": JobStatus.QUEUED.value, "created_at": now, "done": 0, "failed": 0,
            "checkpoint": 0, "chunk": 0,
        })
        pipe.zadd(keys.jobs(), {job_id: now})
        pipe.sadd(keys.active_jobs(), job_id)
        pipe.execute()
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(job_id, raw) if raw else None

    def require(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise JobError(f"no batch job {job_id!r} (see `inferq batch get`)")
        return record

    def newest(self, limit: int = LISTED) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        return self._records(
            [i.decode() for i in self.redis.zrevrange(keys.jobs(), 0, limit - 1)])

    def active(self) -> list[JobRecord]:
        """The queued and running jobs, however old, oldest first."""
        return sorted(self._records(self.wanting_driver()), key=lambda j: j.created_at)

    def _records(self, ids: list[str]) -> list[JobRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [JobRecord.from_hash(job_id, raw)
                for job_id, raw in zip(ids, pipe.execute(), strict=True) if raw]

    def stop(self, job_id: str) -> JobStatus:
        """Stop a job: a queued one at once, a running one at its driver's next step (what was
        predicted is kept). Returns the job's status after the request."""
        self.require(job_id)
        return JobStatus(self._stop(keys=[keys.job(job_id), keys.active_jobs()],
                                    args=[time.time()]).decode())

    def resume(self, job_id: str) -> JobStatus:
        """Queue a stopped or failed job again; it goes on from its checkpoint."""
        record = self.require(job_id)
        outcome = self._resume(keys=[keys.job(job_id), keys.active_jobs()])
        if outcome != 1:
            raise JobError(f"job {job_id} is {record.status}: only a stopped or failed job "
                           "can be resumed")
        return JobStatus.QUEUED

    # -- drivers ------------------------------------------------------------------------------

    def wanting_driver(self) -> list[str]:
        return sorted(i.decode() for i in self.redis.smembers(keys.active_jobs()))

    def claim(self, job_id: str, token: str, machine: str) -> bool:
        """Take the job's lease for a new driver, if it wants one that may run here."""
        return self._claim(keys=[keys.job(job_id), keys.job_driver(job_id),
                                 keys.active_jobs()],
                           args=[token, self._leases.ms, machine]) == 1

    def renew(self, job_id: str, token: str) -> bool:
        """Keep the lease; False when it was lost (another driver has the job)."""
        return self._leases.renew(keys.job_driver(job_id), token)

    def release(self, job_id: str, token: str) -> None:
        self._leases.release(keys.job_driver(job_id), token)

    def start_run(self, job_id: str, driver: str) -> None:
        record = self.require(job_id)
        now = time.time()
        fields = {"status": JobStatus.RUNNING.value, "run_started_at": now, "driver": driver,
                  "run_first": record.done + record.failed}
        if record.started_at is None:
            fields["started_at"] = now
        self.redis.hset(keys.job(job_id), mapping=fields)

    def set_total(self, job_id: str, total: int) -> None:
        self.redis.hset(keys.job(job_id), "total", total)

    def sent_chunks(self, job_id: str) -> dict[int, tuple[float, int]]:
        """The chunks queued and not yet written: number -> (when, how many samples)."""
        raw = self.redis.hgetall(keys.job_chunks(job_id))
        sent = {}
        for number, value in raw.items():
            when, _, size = value.decode().partition(":")
            sent[int(number)] = (float(when), int(size))
        return sent

    def answers(self, job_id: str, chunks: list[int]) -> list[ChunkAnswer | None]:
        if not chunks:
            return []
        raw = self.redis.hmget(keys.job_results(job_id), chunks)
        return [ChunkAnswer.from_json(r) if r is not None else None for r in raw]

    def wait_answered(self, job_id: str, timeout: float) -> list[int]:
        """Wait up to ``timeout`` for replicas to answer some of the job's chunks; their
        numbers (those answered since the last call)."""
        return [int(n) for n in self.registry.store.pop_all(keys.job_done(job_id),
                                                      timeout)]

    def send(self, job_id: str, token: str, *, api: str, message: str, chunk: int, size: int,
             extra: int, changes: int) -> ChunkSend:
        """Queue a chunk unless the API's queue already holds a message per two replicas (at
        least one; live traffic goes first), the APIs changed, or the lease was lost."""
        queue = keys.queue(api)
        code = self._send(
            keys=[keys.changes(), queue, keys.extra(queue), keys.replicas(api),
                  keys.job_chunks(job_id), keys.job_driver(job_id)],
            args=[changes, message, extra, chunk, f"{time.time()}:{size}", token])
        return _SENDS[int(code)]

    def unsend(self, job_id: str, chunk: int) -> None:
        """Forget that a chunk was sent (it was withdrawn before any replica took it)."""
        self.redis.hdel(keys.job_chunks(job_id), chunk)

    def commit(self, job_id: str, token: str, api: str, checkpoint: Checkpoint) -> bool:
        """Record a checkpoint and forget the answers of the chunks it wrote; False (nothing
        recorded) when the lease was lost."""
        return self._commit(
            keys=[keys.job(job_id), keys.job_driver(job_id), keys.job_chunks(job_id),
                  keys.job_results(job_id), keys.stats(api)],
            args=[token, checkpoint.written, checkpoint.chunk, checkpoint.position,
                  json.dumps(checkpoint.writers), checkpoint.done, checkpoint.failed,
                  *checkpoint.chunks]) == 1

    def finish(self, job_id: str, token: str, status: JobStatus, error: str = "") -> None:
        """End the job's run: ``status`` (an ended one), and for an error its message."""
        self._finish(keys=[keys.job(job_id), keys.job_driver(job_id),
                           keys.active_jobs(), keys.job_chunks(job_id),
                           keys.job_results(job_id), keys.job_done(job_id)],
                     args=[token, status.value, error, time.time(),
                           1 if status in (JobStatus.SUCCEEDED, JobStatus.WITH_FAILURES) else 0])


def this_machine() -> str:
    """The machine whose local files a job may name (jobs on local paths run only here)."""
    return socket.gethostname()


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
""" + BACKGROUND_ADMIT + """
if refused ~= nil then return refused end
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
