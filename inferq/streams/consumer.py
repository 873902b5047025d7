"""The consumer of one API's stream: ``python -m inferq.streams.consumer API TOKEN``.

A scaler starts it once it holds the stream's lease (``TOKEN``, see :mod:`.runner`). It reads
the source through the consumer group ``inferq:<api>`` as ``<host>-<pid>``, sends the samples
as batch messages on the API's queue (so the API's own replicas predict them, beside its HTTP
and Python traffic, with ``predict_batch`` when the predictor has it), and writes each answer
to the sink in the order of the source, acknowledging an entry only in the same step as its
answer is written (:meth:`~.endpoints.Source.deliver`): no entry is ever lost, and after a
crash one may be answered twice (its ``source_id`` tells).

- **Latency and throughput.** A reader thread blocks on the source and sends what it read
  at once (an entry that comes alone leaves alone), more at a time when more is waiting, up
  to the chunk size that keeps a chunk about as quick to predict as one sample (by the
  replicas' own timings, :class:`~inferq.chunks.ChunkSizer`). The main loop collects the
  answers and writes them; it takes over the sending while live traffic goes first.
- **Live traffic first.** A chunk is queued only while the API's queue holds fewer messages
  than half its replicas (``Queues.enqueue_background``), as a job's are.
- **Bounded.** At most :data:`WINDOW` entries are read and not yet answered.
- **Recovery.** At start, and every :data:`RECLAIM_SECONDS`, entries pending at other (gone)
  consumers are claimed and answered, and so are entries pending at this one that it never
  saw (a read whose answer was lost with a connection or a broker restart); one delivered
  more than :data:`MAX_DELIVERIES` times goes to the dead letter instead of looping, as does
  one trimmed away before it was answered. A chunk whose message expired unserved is sent
  again, :data:`MAX_SENDS` times.
- It stops when its lease is lost, or when the API is deleted or its ``stream`` changes (the
  runner starts the new one); SIGTERM stops reading and answers what is in flight first.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis

from inferq import keys, messages, stack
from inferq.chunks import NICENESS, ChunkSizer
from inferq.configs import Stream, redact_url
from inferq.registry import Admission, Registry
from inferq.samples import check_text
from inferq.streams.endpoints import Answer, Entry, Source, open_source
from inferq.streams.records import Streams

log = logging.getLogger("inferq.streams")

WINDOW = 2048  # entries read and not yet answered, at most
READ_COUNT = 512  # entries one read takes at most
READ_BLOCK_MS = 1000
BATCH_SIZE = 256  # samples a chunk carries at most (fewer when that takes a replica long)
RENEW_SECONDS = 1.0  # the lease is renewed, the API looked at, and the lag reported this often
RECLAIM_SECONDS = 30.0
# An entry pending at this consumer that it does not know was delivered to it in a read whose
# answer never arrived (the connection broke, the broker restarted): claimed again once idle.
LOST_READ_SECONDS = 10.0
MAX_DELIVERIES = 5
MAX_SENDS = 3
CHUNK_EXPIRES_SECONDS = 600.0  # how long a chunk's message may wait for a replica
BUSY_POLL_SECONDS = 0.02  # while live traffic goes first, how soon to try again
STOP_SECONDS = 10.0  # on SIGTERM, how long what is in flight may take to be answered
BROKER_RETRY_SECONDS = 0.5


class LeaseLost(Exception):
    """Another consumer has the stream now."""


@dataclass
class _Flight:
    """A chunk sent and not yet written: its entries in source order, their samples."""

    number: int
    entries: list[Entry]
    samples: list[str | None]  # JSON texts (None: answered at once, not sent)
    answers: dict[int, Answer] = field(default_factory=dict)
    message: str | None = None
    sent_at: float = 0.0
    sends: int = 0

    @property
    def answered(self) -> bool:
        return len(self.answers) == len(self.entries)


class Consumer:
    """Consumes one API's stream; see the module doc."""

    def __init__(self, registry: Registry, api: str, token: str, spec: Stream,
                 source: Source) -> None:
        self.registry = registry
        self.streams = Streams(registry)
        self.api = api
        self.token = token
        self.spec = spec
        self.source = source
        self.name = f"{stack.host_name()}-{os.getpid()}"
        self.replies = keys.reply(f"stream:{api}:{self.name}")
        self.changes = registry.deployments.changes()
        self.sizer = ChunkSizer(BATCH_SIZE)
        # Read and not yet sent, and sent and not yet written (in source order): the reader
        # thread and the main loop share them under ``room``'s lock.
        self.unsent: deque[Entry] = deque()
        self.flights: deque[_Flight] = deque()
        self.numbers = 0
        self.outstanding = 0  # entries read and not yet written
        self.room = threading.Condition()
        self.sending = threading.Lock()
        self.stopping = threading.Event()
        self.next_renew = self.next_reclaim = 0.0
        self.broken_at: float | None = None  # when a connection last broke
        self.counts = {"answered": 0, "failed": 0, "dead": 0}
        self.last_id: str | None = None
        self.written = 0  # entries written, in all
        self.rate: float | None = None
        self._rate_from = (time.monotonic(), 0)  # (when, entries written then)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until stopped; 0 when the stream was handed over or the API went away."""
        self.source.ensure_group()
        self._reclaim(everything=True)
        reader = threading.Thread(target=self._read_forever, name="inferq-stream-reader",
                                  daemon=True)
        reader.start()
        self.next_renew = self.next_reclaim = 0.0
        stop_by: float | None = None
        failures = 0
        try:
            while True:
                now = time.monotonic()
                if self.stopping.is_set() and stop_by is None:
                    stop_by = now + STOP_SECONDS
                if stop_by is not None and (not self.flights or now >= stop_by):
                    return 0
                try:
                    if not self._step(now, stopping=stop_by is not None):
                        return 0
                    failures = 0
                except redis.RedisError as exc:  # a broker or stream away a moment: hold on
                    failures += 1
                    if failures == 1:
                        log.warning('api "%s": the broker or the stream does not answer (%s); '
                                    "retrying, with what is in flight", self.api, exc)
                    self._broke()
                    self.stopping.wait(BROKER_RETRY_SECONDS)
        except LeaseLost:
            log.warning('api "%s": another consumer took the stream over', self.api)
            return 0
        finally:
            self.stopping.set()
            with self.room:
                self.room.notify_all()
            reader.join(timeout=READ_BLOCK_MS / 1000 + 2)
            with contextlib.suppress(redis.RedisError):
                self._report()

    def _step(self, now: float, *, stopping: bool) -> bool:
        """One round of the loop; False when the consumer is to stop."""
        if now >= self.next_renew:
            if not self._still_mine():
                return False
            self._report()
            self.next_renew = now + RENEW_SECONDS
        if now >= self.next_reclaim and not stopping:
            self._reclaim(everything=False)
            self.next_reclaim = now + RECLAIM_SECONDS
        busy = self._send() if not stopping else False
        self._collect(BUSY_POLL_SECONDS if busy else
                      max(0.01, min(self.next_renew, self.next_reclaim) - time.monotonic()))
        if not stopping:
            self._send()  # a replica that answered takes the next chunk: queue one at once
        self._write()
        self._resend_expired()
        return True

    def _read_forever(self) -> None:
        """The reader thread: new entries, while there is room, sent at once; when live
        traffic goes first, the main loop is woken to send them as soon as it can."""
        failures = 0
        while not self.stopping.is_set():
            with self.room:
                while self.outstanding >= WINDOW and not self.stopping.is_set():
                    self.room.wait(0.5)
                count = min(READ_COUNT, WINDOW - self.outstanding)
            if self.stopping.is_set():
                return
            try:
                entries = self.source.read(self.name, count, READ_BLOCK_MS)
                if entries:
                    with self.room:
                        self.outstanding += len(entries)
                        self.unsent.extend(entries)
                    if self._send():
                        self._wake()
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                if failures == 1:
                    log.warning('api "%s": the stream does not answer (%s); retrying',
                                self.api, exc)
                self._broke()
                self._wake()  # what was read is sent by the loop
                self.stopping.wait(BROKER_RETRY_SECONDS)

    def _broke(self) -> None:
        """A connection broke: a read cut short may have left entries pending here unseen,
        and answers of what was in flight may be gone with it: look for both soon."""
        self.broken_at = time.monotonic()
        self.next_reclaim = min(self.next_reclaim, self.broken_at + LOST_READ_SECONDS + 1)

    def _wake(self) -> None:
        with contextlib.suppress(redis.RedisError):  # the loop looks again within a second
            pipe = self.registry.store.pipeline(transaction=False)
            pipe.rpush(self.replies, '{"wake":1}')
            pipe.expire(self.replies, keys.REPLY_TTL_SECONDS)
            pipe.execute()

    # -- sending, collecting, writing ---------------------------------------------------------

    def _send(self) -> bool:
        """Send what was read, in chunks; True when live traffic goes first (it waits).

        One sender at a time (the reader thread, or the loop while live traffic goes first);
        a chunk joins the flights before it is queued, so that its answer, however quick,
        finds it there."""
        with self.sending:
            while True:
                with self.room:
                    awaiting = any(not f.answered for f in self.flights)
                    if not self.unsent or not self.sizer.may_send(awaiting):
                        return False  # nothing to send, or not before the first answer
                    size = min(self.sizer.size, len(self.unsent))
                    entries = [self.unsent.popleft() for _ in range(size)]
                    flight = self._flight(entries)
                    self.flights.append(flight)
                queued = False
                try:
                    queued = flight.answered or self._queue(flight)
                finally:
                    if not queued:  # kept, in order, for the next try (a new number then:
                        # answers of a message that went out after all must not match it)
                        with self.room:
                            self.flights.pop()  # the newest: no other sender added since
                            self.unsent.extendleft(reversed(entries))
                if not queued:
                    return True

    def _flight(self, entries: list[Entry]) -> _Flight:
        """A chunk of ``entries``; those whose sample is no JSON are answered at once."""
        self.numbers += 1
        flight = _Flight(self.numbers, entries, [])
        for position, entry in enumerate(entries):
            if entry.sample is None:
                problem = f'the entry has no field "{self.spec.field}"'
            else:
                try:
                    check_text(entry.sample)  # then sent as it is, never decoded here
                    flight.samples.append(entry.sample)
                    continue
                except ValueError as exc:
                    problem = f"the sample is not JSON: {exc}"
            flight.samples.append(None)
            flight.answers[position] = Answer(entry.id, error=problem, sample=entry.sample)
        return flight

    def _queue(self, flight: _Flight) -> bool:
        """Queue the flight's samples as one batch message; False when the queue is busy."""
        live = [i for i in range(len(flight.entries)) if i not in flight.answers]
        expires = time.time() + CHUNK_EXPIRES_SECONDS
        replies = [(self.replies, f"{flight.number}.{i}", expires) for i in live]
        message = messages.encode_batch(uuid.uuid4().hex, [flight.samples[i] for i in live],
                                        replies, queue=keys.queue(self.api), texts=True)
        admission = self.registry.queues.enqueue_background(
            self.api, message, changes=self.changes, extra=len(live) - 1)
        if admission == Admission.STALE:  # something was deployed or deleted
            self.changes = self.registry.deployments.changes()
            return False
        if admission != Admission.QUEUED:
            return False
        flight.message, flight.sent_at = message, time.monotonic()
        flight.sends += 1
        return True

    def _collect(self, wait: float) -> None:
        """Answers that came back (waiting up to ``wait`` for one, or for a wake-up)."""
        replies = self.registry.queues.pop_replies(self.replies, wait)
        with self.room:
            by_number = {f.number: f for f in self.flights}
            for reply in replies:
                self._take(reply, by_number)

    def _take(self, reply: dict[str, Any], by_number: dict[int, _Flight]) -> None:
        """One reply's answers into their flights."""
        for answer in reply.get("answers", [reply]):
            number, _, position = str(answer.get("id", "")).partition(".")
            flight = by_number.get(int(number)) if number.isdigit() else None
            if flight is None or not position.isdigit() or flight.answered:
                continue  # a wake-up, or an answer had already (a chunk sent again)
            index = int(position)
            entry = flight.entries[index]
            flight.answers[index] = (
                Answer(entry.id, result=messages.compact(answer["result"]))
                if "error" not in answer else
                Answer(entry.id, error=answer["error"], sample=entry.sample))
            if flight.answered and flight.sent_at:  # sized by what predicting it took
                took = reply.get("took")
                self.sizer.answered(len(flight.entries), float(took) if took is not None
                                    else time.monotonic() - flight.sent_at)

    def _write(self) -> None:
        """Deliver the answered chunks at the head, in the order of the source."""
        with self.room:  # only this loop takes flights off; the reader adds at the end
            heads = list(itertools.takewhile(lambda f: f.answered, self.flights))
        done = [f.answers[i] for f in heads for i in range(len(f.entries))]
        if not done:
            return
        self.source.deliver(done)
        failed = sum(1 for a in done if a.error is not None)
        self.counts["answered"] += len(done) - failed
        self.counts["failed"] += failed
        self.written += len(done)
        self.last_id = done[-1].source_id
        with self.room:
            for _ in heads:
                self.flights.popleft()
            self.outstanding -= len(done)
            self.room.notify_all()

    def _resend_expired(self) -> None:
        """A chunk whose message expired unserved (a replica drops it) is sent again, as is
        one sent before a connection broke and unanswered :data:`LOST_READ_SECONDS` after (its
        answer may have been lost with it); after :data:`MAX_SENDS` sends its entries get an
        error."""
        now = time.monotonic()
        broke = self.broken_at
        if broke is not None and now - broke >= LOST_READ_SECONDS:
            self.broken_at = None  # one look after each break
        else:
            broke = None
        with self.room:
            self._resend(now, broke)

    def _resend(self, now: float, broke: float | None) -> None:
        for flight in self.flights:
            expired = now - flight.sent_at >= CHUNK_EXPIRES_SECONDS + 1
            lost = broke is not None and flight.sent_at <= broke
            if flight.answered or flight.message is None or not (expired or lost):
                continue  # (no message: being sent right now)
            if flight.sends >= MAX_SENDS:
                for i, entry in enumerate(flight.entries):
                    flight.answers.setdefault(i, Answer(
                        entry.id, sample=entry.sample,
                        error=f"no replica answered it in {MAX_SENDS} sends of "
                              f"{CHUNK_EXPIRES_SECONDS:.0f}s"))
            else:
                self._queue(flight)

    # -- the lease, the API, recovery, reports ------------------------------------------------

    def _still_mine(self) -> bool:
        """Renew the lease; False when the API is gone or its stream changed (the runner starts
        a consumer of the new one)."""
        if not self.streams.renew(self.api, self.token):
            raise LeaseLost
        deployed = self.registry.deployments.api(self.api)
        if deployed is None or deployed.api.stream != self.spec:
            log.info('api "%s": %s; the consumer of %s stops', self.api,
                     "deleted" if deployed is None else "its stream changed", self.spec.source)
            return False
        return True

    def _reclaim(self, *, everything: bool) -> None:
        """Answer the entries pending at other consumers (gone: one consumer holds the lease)
        and those pending here that this one never saw: claimed and sent again, or into the
        dead letter when delivered too often."""
        with self.room:
            known = {e.id for e in self.unsent} | {e.id for f in self.flights for e in f.entries}
        pending = [p for p in self.source.pending(2 * WINDOW) if p.id not in known and (
            p.consumer != self.name or p.idle_ms >= LOST_READ_SECONDS * 1000)]
        if not pending:
            if everything:
                self.source.retire_others(self.name)
            return
        dead = [p for p in pending if p.deliveries > MAX_DELIVERIES]
        claimed = self.source.claim(self.name, [p.id for p in pending if p not in dead])
        answers = [Answer(p.id, error=f"delivered {p.deliveries} times and never answered; "
                                      "not delivered again") for p in dead]
        answers += [Answer(e.id, error="trimmed from the stream before it was answered")
                    for e in claimed if e.sample is None]
        if answers:
            self.source.deliver(answers)
            self.counts["failed"] += len(answers)
            self.counts["dead"] += len(answers)
        again = [e for e in claimed if e.sample is not None]
        if again:
            log.warning('api "%s": %d entries delivered before and never answered are sent '
                        "again", self.api, len(again))
            with self.room:
                self.outstanding += len(again)
                self.unsent.extendleft(reversed(again))  # before newer ones: they are older
        if everything:
            self.source.retire_others(self.name)

    def _report(self) -> None:
        """Counts since the last report, the rate, and the source's lag, to the broker."""
        now = time.monotonic()
        since, written = self._rate_from
        if now - since >= 1.0:
            self.rate = (self.written - written) / (now - since)
            self._rate_from = (now, self.written)
        lag = self.source.lag()
        counts, self.counts = self.counts, {"answered": 0, "failed": 0, "dead": 0}
        self.streams.report(self.api, answered=counts["answered"], failed=counts["failed"],
                            dead=counts["dead"], last_id=self.last_id,
                            undelivered=lag.undelivered, unsent=len(self.unsent),
                            lag=lag.total,
                            at_least=lag.at_least, rate=self.rate, consumer=self.name)


def consume(registry: Registry, api: str, token: str) -> int:
    """Consume ``api``'s stream while ``token`` holds its lease; the exit code."""
    deployed = registry.deployments.api(api)
    if deployed is None or deployed.api.stream is None:
        log.info('api "%s" has no stream (any more)', api)
        return 0
    spec = deployed.api.stream
    source = open_source(spec, api, registry.url)
    consumer = Consumer(registry, api, token, spec, source)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stopping.set())
    where = redact_url(spec.url) if spec.url else "the broker"
    log.info('api "%s": consuming %s on %s as %s (group %s)', api, spec.source, where,
             consumer.name, spec.group(api))
    try:
        return consumer.run()
    finally:
        source.close()


def main(argv: list[str] | None = None) -> int:
    api, token = (argv if argv is not None else sys.argv[1:])[:2]
    os.nice(NICENESS)  # live requests get the CPU first on a busy host
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stream %(message)s")
    registry = Registry(stack.broker_url())
    try:
        return consume(registry, api, token)
    except redis.RedisError as exc:
        log.error('api "%s": the broker or the stream is unreachable (%s); the consumer '
                  "starts again", api, exc)
        return 1
    finally:
        registry.close()


if __name__ == "__main__":
    sys.exit(main())
