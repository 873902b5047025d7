"""Where a stream's samples come from and where its answers go: a small interface, and Redis
Streams behind it.

A source delivers entries to one named consumer of a group, at least once: :meth:`read` the
new ones, list those delivered and not acknowledged (:meth:`pending`, with how many times
each was delivered), :meth:`claim` them for this consumer, and :meth:`deliver` answers, which
writes them to the sink and only then acknowledges their entries, in one step. The consumer
(:mod:`inferq.streams.consumer`) needs nothing else, so a Kafka topic (a consumer group's
committed offsets) or NATS JetStream (a durable consumer's acks) could stand behind the same
methods without touching the replicas or the scaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis

from inferq.configs import Deployment, Stream, redact_url
from inferq.errors import DeployError

# Redis before 7 says nothing of a group's lag: entries past the group's last delivered one
# are counted then, up to this many (``inferq get`` shows "1000+").
LAG_COUNT_LIMIT = 1000


@dataclass(frozen=True)
class Entry:
    """A source entry: its id and its sample's JSON text (None: the entry has no such field,
    or it was trimmed away before it was answered)."""

    id: str
    sample: str | None


@dataclass(frozen=True)
class Pending:
    """An entry delivered to a consumer and not acknowledged yet."""

    id: str
    consumer: str
    idle_ms: int  # since it was last delivered
    deliveries: int


@dataclass(frozen=True)
class Answer:
    """An entry's answer: the prediction as JSON text, or an error; a failed one goes to the
    dead letter too, with its sample."""

    source_id: str
    result: str | None = None
    error: str | None = None
    sample: str | None = None


@dataclass(frozen=True)
class Lag:
    """Entries added and not answered yet: not delivered to the group (``undelivered``, None
    when unknown; ``at_least`` when counted only up to :data:`LAG_COUNT_LIMIT`), and delivered
    but not acknowledged (``pending``)."""

    undelivered: int | None
    pending: int
    at_least: bool = False

    @property
    def total(self) -> int:
        return (self.undelivered or 0) + self.pending


class Source(Protocol):
    """What a stream consumer needs of its source and sink (see the module doc)."""

    def ensure_group(self) -> None: ...

    def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]: ...

    def pending(self, count: int) -> list[Pending]: ...

    def claim(self, consumer: str, ids: list[str]) -> list[Entry]: ...

    def deliver(self, answers: list[Answer]) -> None: ...

    def retire_others(self, consumer: str) -> None: ...

    def lag(self) -> Lag: ...

    def close(self) -> None: ...


# KEYS: the sink, the dead letter, the source; ARGV: the group, the sinks' length, then four
# per answer: the source entry's id, "result" or "error", its text, the sample (for an error).
_DELIVER = """
local ids = {}
for i = 3, #ARGV, 4 do
  local id, field, text = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'source_id', id, field, text)
  if field == 'error' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'source_id', id,
               'sample', ARGV[i + 3], 'error', text)
  end
  ids[#ids + 1] = id
  if #ids == 500 then redis.call('XACK', KEYS[3], ARGV[1], unpack(ids)); ids = {} end
end
if #ids > 0 then redis.call('XACK', KEYS[3], ARGV[1], unpack(ids)) end
return 1
"""


class RedisStream:
    """A Redis stream consumed through a consumer group, its answers added to another stream
    on the same Redis (``XACK`` in the same script as their ``XADD``)."""

    def __init__(self, spec: Stream, group: str, url: str) -> None:
        self.spec = spec
        self.group = group
        # Any: redis-py types replies bytes | str; they are bytes here.
        self.redis: Any = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5,
                                               health_check_interval=30)
        self._deliver = self.redis.register_script(_DELIVER)

    def ensure_group(self) -> None:
        """Create the consumer group where it starts (``start``: new entries, or all); one
        that exists keeps its position (a redeploy goes on where the last one stopped)."""
        try:
            self.redis.xgroup_create(self.spec.source, self.group,
                                     id="$" if self.spec.start == "new" else "0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new entries, waiting up to ``block_ms`` for one."""
        raw = self.redis.xreadgroup(self.group, consumer, {self.spec.source: ">"}, count=count,
                                    block=max(1, block_ms))
        return [self._entry(entry_id, fields) for _, entries in raw or [] for entry_id, fields
                in entries]

    def pending(self, count: int) -> list[Pending]:
        raw = self.redis.xpending_range(self.spec.source, self.group, min="-", max="+",
                                        count=count)
        return [Pending(p["message_id"].decode(), p["consumer"].decode(),
                        int(p["time_since_delivered"]), int(p["times_delivered"]))
                for p in raw]

    def claim(self, consumer: str, ids: list[str]) -> list[Entry]:
        """Take ``ids`` over for ``consumer``; an entry trimmed away since it was delivered
        comes back without its sample (Redis answers nil for it, redis #7021)."""
        if not ids:
            return []
        raw = self.redis.xclaim(self.spec.source, self.group, consumer, min_idle_time=0,
                                message_ids=ids)
        found = {e.id: e for e in (self._entry(i, f) for i, f in raw if i is not None)}
        return [found.get(i, Entry(i, None)) for i in ids]

    def deliver(self, answers: list[Answer]) -> None:
        """Add each answer to the sink (a failed one to the dead letter too), then acknowledge
        their entries, in one script (atomic, as a MULTI, at a fraction of the commands): an
        entry is acknowledged only with its answer."""
        if not answers:
            return
        spec = self.spec
        args: list[Any] = [self.group, spec.sink_max_len]
        for answer in answers:
            if answer.error is None:
                args += [answer.source_id, "result", answer.result, ""]
            else:
                args += [answer.source_id, "error", answer.error, answer.sample or ""]
        self._deliver(keys=[spec.sink, spec.dead_letter, spec.source], args=args)

    def retire_others(self, consumer: str) -> None:
        """Remove the group's other consumers that hold nothing (consumers before this one,
        one per process: the group's list must not grow with every restart)."""
        for info in self.redis.xinfo_consumers(self.spec.source, self.group):
            name = _text(info["name"])
            if name != consumer and int(info["pending"]) == 0:
                self.redis.xgroup_delconsumer(self.spec.source, self.group, name)

    def lag(self) -> Lag:
        groups = self.redis.xinfo_groups(self.spec.source)
        info = next((g for g in groups if _text(g["name"]) == self.group), None)
        if info is None:
            return Lag(None, 0)
        pending = int(info["pending"])
        if info.get("lag") is not None:  # Redis 7 counts it
            return Lag(int(info["lag"]), pending)
        last = _text(info["last-delivered-id"])
        after = self.redis.xrange(self.spec.source, min=f"({last}", max="+",
                                  count=LAG_COUNT_LIMIT)
        return Lag(len(after), pending, at_least=len(after) >= LAG_COUNT_LIMIT)

    def close(self) -> None:
        self.redis.close()

    def _entry(self, entry_id: Any, fields: dict[bytes, bytes] | None) -> Entry:
        value = (fields or {}).get(self.spec.field.encode())
        return Entry(_text(entry_id), value.decode("utf-8", "replace") if value is not None
                     else None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_source(spec: Stream, api: str, broker_url: str) -> Source:
    """The source of ``api``'s stream: on the Redis its ``url`` names, else the broker's."""
    return RedisStream(spec, spec.group(api), spec.url or broker_url)


def start_groups(deployment: Deployment, broker_url: str) -> None:
    """Create the consumer group of each of ``deployment``'s streams at deploy time, so that
    ``start: new`` means the entries added once the deploy returned (not once a consumer
    came up a moment later). Raises :class:`DeployError` naming the API when a source's
    Redis cannot be reached or refuses (its password never shown)."""
    for api in deployment.apis:
        if api.stream is None:
            continue
        url = api.stream.url or broker_url
        try:
            source = open_source(api.stream, api.name, broker_url)
            source.ensure_group()
        except (redis.RedisError, OSError, ValueError) as exc:
            raise DeployError(f"api {api.name}: its stream {api.stream.source!r} on "
                              f"{redact_url(url)} cannot be read: "
                              f"{exc}") from None
