"""The driver of one batch job: ``python -m inferq.jobs.driver JOB_ID TOKEN``.

A scaler starts it (:mod:`inferq.jobs.runner`) once it holds the job's lease (``TOKEN``). The
driver reads the input from the job's checkpoint in chunks (up to ``batch_size`` samples,
sized by :class:`ChunkSizer`) and sends each chunk as one batch message on the API's queue,
where the API's replicas predict it like any other and store its answer in the job's results
in Redis, with their acknowledgement. The driver writes the answers to the output in input
order, failed samples also to the dead letter, and records a checkpoint (samples written,
where the input goes on, the output's state) every half second, and whenever an S3 output
uploads a part.

What it holds stays bounded whatever the input's size: at most ``window`` samples are read
and not yet written. It never floods the queue ahead of live traffic either: a chunk is
queued only while the API's queue holds fewer messages than half the API's replicas (at least
one), so a synchronous request finds about half a chunk per replica ahead of it, whatever the
job's size; a chunk takes about as long to predict as a single sample; and the driver runs
at a lower CPU priority (nice 10), so on a busy host the gateway and the replicas answering
live requests get the CPU first.

Nothing is predicted twice: which chunks were queued is recorded with the queueing itself
(one script), so a driver that goes on after another one died waits for those chunks'
answers instead of sending them again; a stop withdraws the chunks no replica took yet.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis

from inferq import keys, messages
from inferq.chunks import NICENESS, ChunkSizer
from inferq.errors import JobError
from inferq.jobs.files import Chunk, LocalSource, Position, Sink, Source, open_sink, open_source
from inferq.jobs.records import Checkpoint, ChunkSend, JobRecord, Jobs, JobStatus, this_machine
from inferq.messages import ChunkAnswer
from inferq.registry import Registry

log = logging.getLogger("inferq.jobs.driver")

CHUNK_BYTES = 4 << 20  # a chunk also ends once its lines hold this much
COMMIT_SECONDS = 0.5  # a checkpoint at most this often (and at the end, a stop, an S3 part)
RENEW_SECONDS = 1.0  # the lease is renewed, and a stop looked for, this often
BUSY_POLL_SECONDS = 0.02  # while the queue is busy, how soon to try again


class LeaseLost(Exception):
    """Another driver has the job now (this one was too slow to renew its lease)."""


@dataclass
class _Flight:
    """A chunk read and not yet written."""

    chunk: Chunk
    message: str | None = None  # as this driver queued it (None: not queued by this driver)
    sent_at: float | None = None  # when it was queued, by this driver or an earlier one
    answer: ChunkAnswer | None = None


def drive(registry: Registry, job_id: str, token: str) -> JobStatus | None:
    """Drive the job that ``token`` holds the lease of to its end, a stop, or a failure; the
    status it ended with (None when another driver took it over)."""
    jobs = Jobs(registry)
    record = jobs.require(job_id)
    jobs.start_run(job_id, f"{this_machine()}:{os.getpid()}")
    try:
        deployed = registry.deployments.api(record.api)
        if deployed is None:
            raise JobError(f'api "{record.api}" is not deployed; deploy it and resume the job '
                           f"(inferq batch submit --resume {job_id})")
        source = open_source(record.input)
        output = open_sink(record.output, record.writers.get("output"))
        dead = open_sink(record.dead_letter, record.writers.get("dead_letter"), lazy=True)
        return Driver(registry, jobs, record, token, source, output, dead,
                      retention=deployed.api.compute.async_retention).run()
    except LeaseLost:
        log.warning("job %s: another driver took over", job_id)
        return None
    except JobError as exc:
        log.error("job %s failed: %s", job_id, exc)
        jobs.finish(job_id, token, JobStatus.FAILED, str(exc))
        return JobStatus.FAILED


class Driver:
    """Drives one job from its checkpoint, its input and outputs open; see the module doc."""

    def __init__(self, registry: Registry, jobs: Jobs, record: JobRecord, token: str,
                 source: Source, output: Sink, dead: Sink, *, retention: float) -> None:
        self.registry = registry
        self.jobs = jobs
        self.record = record
        self.job_id = record.id
        self.api = record.api
        self.token = token
        self.source = source
        self.output = output
        self.dead = dead  # the dead letter
        self.retention = retention  # a chunk unanswered this long is queued again
        self.changes = registry.deployments.changes()
        self.sizer = ChunkSizer(record.batch_size)
        self.flights: deque[_Flight] = deque()  # read and not yet written, in input order
        self.unsent: deque[_Flight] = deque()  # read and not queued (the queue was busy)
        self.waiting: dict[int, _Flight] = {}  # queued and not answered, by chunk number
        self.in_flight = 0  # samples read and not yet written
        # Where the job stands (written, next chunk, reading position), and what was written
        # since the last checkpoint.
        self.written, self.next_chunk = record.checkpoint, record.chunk
        self.position = Position.from_json(record.position)
        self.pending_done = self.pending_failed = 0
        self.pending_chunks: list[int] = []
        self.committed_at = time.monotonic()

    def run(self) -> JobStatus:
        """Drive the job until it ends or stops; :class:`LeaseLost` when another driver took
        it over."""
        record = self.record
        if record.total is None and isinstance(self.source, LocalSource):
            self.jobs.set_total(self.job_id, self.source.count())
        sent_before = self.jobs.sent_chunks(self.job_id)

        def size_of(number: int) -> int:  # a chunk queued before is read again alike
            return sent_before[number][1] if number in sent_before else self.sizer.size

        chunks = self.source.chunks(self.position, number=record.chunk, first=record.checkpoint,
                                    size_of=size_of, max_bytes=CHUNK_BYTES)
        next_renew = 0.0
        eof = False
        answered: list[int] | None = None  # None: look for every awaited chunk's answer
        while True:
            if time.monotonic() >= next_renew:
                if not self.jobs.renew(self.job_id, self.token):
                    raise LeaseLost
                if self.jobs.require(self.job_id).stop:
                    return self._stop()
                self._requeue_lost()
                answered = None  # a sweep now and then: a wake-up may have gone missing
                next_renew = time.monotonic() + RENEW_SECONDS
            self._collect(answered)
            self._write()
            # Read a chunk only when it can be sent: its size is decided then (ChunkSizer).
            busy = self._send()
            while (not busy and not eof and self.in_flight < record.window
                   and self.sizer.may_send(bool(self.waiting or self.unsent))):
                chunk = next(chunks, None)
                if chunk is None:
                    eof = True
                    if record.total is None:
                        self.jobs.set_total(self.job_id, self.written + self.in_flight)
                    break
                before = sent_before.pop(chunk.number, None)
                flight = _Flight(chunk, sent_at=before[0] if before else None)
                self.flights.append(flight)
                self.in_flight += chunk.size
                if before:
                    self.waiting[chunk.number] = flight
                else:
                    self.unsent.append(flight)
                    busy = self._send()
            if eof and not self.flights:
                return self._end()
            answered = self.jobs.wait_answered(self.job_id, BUSY_POLL_SECONDS if busy else
                                               max(0.01, next_renew - time.monotonic()))

    # -- sending and collecting ---------------------------------------------------------------

    def _send(self) -> bool:
        """Queue the chunks read and not queued yet; True when the API's queue was busy (they
        wait to be sent)."""
        now = time.time()
        while self.unsent:
            flight = self.unsent[0]
            chunk = flight.chunk
            if not chunk.samples:  # every line of it was no JSON: nothing to predict
                flight.answer = ChunkAnswer("", [])
                self.unsent.popleft()
                continue
            message = messages.encode_job_chunk(
                uuid.uuid4().hex, chunk.samples, queue=keys.queue(self.api), job=self.job_id,
                chunk=chunk.number, first=chunk.first, expires_at=now + self.retention,
                indexes=chunk.indexes if chunk.bad else None)
            outcome = self.jobs.send(self.job_id, self.token, api=self.api, message=message,
                                     chunk=chunk.number, size=chunk.size,
                                     extra=len(chunk.samples) - 1, changes=self.changes)
            if outcome == ChunkSend.STALE:  # something was deployed or deleted: is it still here?
                self.changes = self.registry.deployments.changes()
                if self.registry.deployments.api(self.api) is None:
                    raise JobError(f'api "{self.api}" was deleted; deploy it and resume the job '
                                   f"(inferq batch submit --resume {self.job_id})")
                return True
            if outcome == ChunkSend.LOST:
                raise LeaseLost
            if outcome == ChunkSend.BUSY:
                return True
            flight.message, flight.sent_at = message, now
            self.unsent.popleft()
            self.waiting[chunk.number] = flight
        return False

    def _requeue_lost(self) -> None:
        """Queue again a chunk unanswered past the API's async_retention (its message expired
        unserved: a replica drops an expired message, so nothing runs twice)."""
        now = time.time()
        for number, flight in list(self.waiting.items()):
            if flight.sent_at is not None and now - flight.sent_at > self.retention:
                log.warning("job %s: chunk %d was queued %.0fs ago and never answered (past the "
                            "API's async_retention); queueing it again", self.job_id, number,
                            now - flight.sent_at)
                del self.waiting[number]
                flight.sent_at = flight.message = None
                self.unsent.append(flight)

    def _collect(self, answered: list[int] | None) -> None:
        """The answers of the chunks ``answered`` (None: of every chunk awaited)."""
        # Once each: a chunk sent twice may be answered twice.
        numbers = list(self.waiting) if answered is None else \
            list(dict.fromkeys(n for n in answered if n in self.waiting))
        for number, answer in zip(numbers, self.jobs.answers(self.job_id, numbers),
                                  strict=True):
            if answer is None:
                continue
            flight = self.waiting.pop(number)
            flight.answer = answer
            if answer.took is not None:
                self.sizer.answered(len(flight.chunk.samples), answer.took)

    def _write(self) -> None:
        """Write the answered chunks at the head, in order; checkpoint when it is due."""
        part_uploaded = False
        while self.flights and self.flights[0].answer is not None:
            flight = self.flights.popleft()
            chunk, answer = flight.chunk, flight.answer
            assert answer is not None  # the loop's condition
            lines, failed = answer.lines, answer.failed
            if chunk.bad:
                lines, failed = _merge_bad(chunk, lines, failed)
            part_uploaded |= self.output.write(lines)
            if failed:
                samples = dict(zip(chunk.indexes, chunk.samples, strict=True))  # JSON texts
                dead = [_json_line({"index": i, "sample": chunk.bad[i][0] if i in chunk.bad
                                    else json.loads(samples[i]), "error": error})
                        for i, error in failed]
                self.dead.write("".join(dead))
            self.in_flight -= chunk.size
            self.pending_failed += len(failed)
            self.pending_done += chunk.size - len(failed)
            self.pending_chunks.append(chunk.number)
            self.written, self.next_chunk = chunk.first + chunk.size, chunk.number + 1
            self.position = chunk.after
        if self.pending_chunks and (part_uploaded or (self._local_output() and
                                    time.monotonic() - self.committed_at >= COMMIT_SECONDS)):
            self._commit()

    # -- checkpoints and ends -----------------------------------------------------------------

    def _local_output(self) -> bool:
        return not self.output.uri.startswith("s3://")

    def _commit(self) -> None:
        checkpoint = Checkpoint(
            written=self.written, chunk=self.next_chunk, position=self.position.to_json(),
            writers={"output": self.output.state(), "dead_letter": self.dead.state()},
            done=self.pending_done, failed=self.pending_failed, chunks=self.pending_chunks)
        if not self.jobs.commit(self.job_id, self.token, self.api, checkpoint):
            raise LeaseLost
        self.pending_done = self.pending_failed = 0
        self.pending_chunks = []
        self.committed_at = time.monotonic()

    def _end(self) -> JobStatus:
        self.output.seal()  # an S3 output's last part uploaded and in the checkpoint, so a
        self.dead.seal()  # driver taking over from here completes the same upload
        self._commit()
        self.output.close()
        self.dead.close()
        failed = self.jobs.require(self.job_id).failed
        status = JobStatus.WITH_FAILURES if failed else JobStatus.SUCCEEDED
        self.jobs.finish(self.job_id, self.token, status)
        log.info("job %s: %s", self.job_id, status)
        return status

    def _stop(self) -> JobStatus:
        """Withdraw the chunks no replica took yet, keep what was written, end ``stopped``.
        Chunks that replicas hold are answered into the job's results, for a resume."""
        queue = keys.queue(self.api)
        for number, flight in list(self.waiting.items()):
            if flight.message is not None and self.registry.queues.withdraw(queue, flight.message):
                self.jobs.unsend(self.job_id, number)
                del self.waiting[number]
        self._collect(None)
        self._write()
        self._commit()
        self.jobs.finish(self.job_id, self.token, JobStatus.STOPPED)
        log.info("job %s: stopped after %d samples", self.job_id, self.written)
        return JobStatus.STOPPED


def _merge_bad(chunk: Chunk, lines: str, failed: list[tuple[int, str]]
               ) -> tuple[str, list[tuple[int, str]]]:
    """A chunk's output and failures with its lines that were no JSON put back in place."""
    answered = iter(lines.splitlines())
    out = []
    for index in range(chunk.first, chunk.first + chunk.size):
        if index in chunk.bad:
            out.append(_json_line({"index": index, "error": chunk.bad[index][1]}))
        else:
            out.append(next(answered) + "\n")
    failed = sorted([*failed, *((i, error) for i, (_, error) in chunk.bad.items())])
    return "".join(out), failed


def _json_line(value: dict[str, Any]) -> str:
    return messages.compact(value) + "\n"


def main(argv: list[str] | None = None) -> int:
    from inferq import stack

    job_id, token = (argv if argv is not None else sys.argv[1:])[:2]
    os.nice(NICENESS)  # batch work: the CPU goes to live requests first
    logging.basicConfig(level=logging.INFO, format="%(asctime)s job driver %(message)s")
    registry = Registry(stack.broker_url())
    try:
        status = drive(registry, job_id, token)
    except redis.RedisError as exc:
        log.error("job %s: the broker is unreachable (%s); another driver goes on", job_id, exc)
        return 1
    finally:
        registry.close()
    return 0 if status else 1


if __name__ == "__main__":
    sys.exit(main())
