"""What the APIs did: request counts and latency, the prediction tracker, replica logs.

Everything here is bounded whatever clients or predictors send: a classification tracker
keeps :data:`TRACKER_CLASSES_KEPT` classes of labels cut to :data:`TRACKER_LABEL_CHARS`, and
an API's log keeps its newest :data:`LOG_LINES_KEPT` lines of :data:`LOG_LINE_CHARS` each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from inferq import keys
from inferq.messages import Command
from inferq.registry.store import Store, decoded

LOG_LINES_KEPT = 10_000  # per API
LOG_LINE_CHARS = 10_000  # longer lines are cut: 10,000 kept lines must not hold gigabytes
# A classification tracker keeps this many classes per API (any more is counted as "other")
# and labels this long: a predictor answering free text must not fill Redis or `inferq get`.
TRACKER_CLASSES_KEPT = 100
TRACKER_LABEL_CHARS = 64

# ARGV: how many values, their sum, their min, their max.
_TRACK_VALUES = """
redis.call('HINCRBY', KEYS[1], 'count', ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[1], 'sum', ARGV[2])
local low = redis.call('HGET', KEYS[1], 'min')
if low == false or tonumber(ARGV[3]) < tonumber(low) then
  redis.call('HSET', KEYS[1], 'min', ARGV[3])
end
local high = redis.call('HGET', KEYS[1], 'max')
if high == false or tonumber(ARGV[4]) > tonumber(high) then
  redis.call('HSET', KEYS[1], 'max', ARGV[4])
end
return 1
"""

# ARGV: the label, the classes kept at most, how many predictions of it.
_TRACK_CLASS = """
local field = 'class:' .. ARGV[1]
local kept = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], 'other')
if kept < tonumber(ARGV[2]) or redis.call('HEXISTS', KEYS[1], field) == 1 then
  return redis.call('HINCRBY', KEYS[1], field, ARGV[3])
end
return redis.call('HINCRBY', KEYS[1], 'other', ARGV[3])
"""


@dataclass(frozen=True)
class RequestStats:
    """An API's counters: HTTP answers by status class and their latency (from the
    gateways), batch job samples written (from the jobs' drivers), and samples predicted by
    any way (from the replicas)."""

    ok: int = 0  # 2xx
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx
    count: int = 0
    latency_sum: float = 0.0  # seconds
    job_samples: int = 0
    job_failed: int = 0
    predictions: int = 0  # samples the replicas predicted, whichever way they came
    prediction_errors: int = 0  # ... of which failed

    @property
    def avg_latency(self) -> float | None:
        return self.latency_sum / self.count if self.count else None


_STATS_FIELDS = {"2xx": "ok", "4xx": "client_errors", "5xx": "server_errors"}


@dataclass(frozen=True)
class TrackerStats:
    """A classification tracker's counts (most frequent first, and ``other``), or a
    regression tracker's count, min, max and mean."""

    classes: dict[str, int] | None = None
    other: int = 0
    count: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As ``inferq get --output json`` shows it; {} when nothing was tracked."""
        if self.classes is not None:
            shown: dict[str, Any] = {"classes": self.classes}
            return {**shown, "other": self.other} if self.other else shown
        if self.count:
            return {"count": self.count, "min": self.min, "max": self.max, "mean": self.mean}
        return {}


class LogLine(NamedTuple):
    id: str  # the stream entry's id
    replica: str
    line: str


class Telemetry:
    """Request statistics, the prediction tracker and the replicas' logs."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    # -- request statistics -------------------------------------------------------------------

    def add_request_stats(self, stats: dict[str, dict[str, float]]) -> None:
        """Add per-API counters (``2xx``, ``4xx``, ``5xx``, ``count``, ``latency_sum``)."""
        pipe = self.store.pipeline(transaction=True)
        for api, values in stats.items():
            for name, value in values.items():
                pipe.hincrbyfloat(keys.stats(api), name, value)
        pipe.execute()

    def request_stats(self, api: str) -> RequestStats:
        values = {_STATS_FIELDS.get(k, k): float(v)
                  for k, v in decoded(self.redis.hgetall(keys.stats(api))).items()}
        return RequestStats(
            ok=int(values.get("ok", 0)), client_errors=int(values.get("client_errors", 0)),
            server_errors=int(values.get("server_errors", 0)), count=int(values.get("count", 0)),
            latency_sum=values.get("latency_sum", 0.0),
            job_samples=int(values.get("job_samples", 0)),
            job_failed=int(values.get("job_failed", 0)),
            predictions=int(values.get("predictions", 0)),
            prediction_errors=int(values.get("prediction_errors", 0)))

    @staticmethod
    def count_commands(api: str, predictions: int, errors: int) -> list[Command]:
        """The commands that count samples a replica predicted (and how many failed), sent
        with its acknowledgement: every way a sample came counts, HTTP, Python, plain Celery
        and jobs, where the status classes count the gateways' HTTP answers."""
        if not predictions:
            return []
        return [("HINCRBY", keys.stats(api), "predictions", predictions),
                ("HINCRBY", keys.stats(api), "prediction_errors", errors)]

    # -- the tracker --------------------------------------------------------------------------

    def track_class(self, api: str, label: str) -> None:
        """Count one prediction of ``label`` (see :meth:`track_commands`)."""
        for command in self.track_commands(api, {label: 1}, []):
            self.redis.execute_command(*command)

    @staticmethod
    def track_commands(api: str, classes: dict[str, int], values: list[float]) -> list[Command]:
        """The commands that count ``classes`` (label -> predictions) or add regression
        ``values`` to the API's tracker, for the replica to send with its acknowledgement
        (EVAL, not EVALSHA: a MULTI cannot recover from NOSCRIPT after a broker restart).

        A label is cut to :data:`TRACKER_LABEL_CHARS`; one past the first
        :data:`TRACKER_CLASSES_KEPT` classes counts as ``other`` (one script per label, so
        replicas tracking at once never keep more classes than the limit)."""
        key = keys.tracker(api)
        commands: list[Command] = []
        for label, count in classes.items():
            commands.append(("EVAL", _TRACK_CLASS, 1, key, cut_label(label),
                             TRACKER_CLASSES_KEPT, count))
        if values:
            commands.append(("EVAL", _TRACK_VALUES, 1, key, len(values),
                             repr(float(sum(values))), repr(min(values)), repr(max(values))))
        return commands

    def tracker_stats(self, api: str) -> TrackerStats:
        raw = {k.decode(errors="replace"): v.decode()
               for k, v in self.redis.hgetall(keys.tracker(api)).items()}
        classes: dict[str, int] = {}
        for name, count in raw.items():
            if name.startswith("class:"):
                # Cut here too: counts stored before labels were cut must not show whole.
                label = cut_label(name[len("class:"):])
                classes[label] = classes.get(label, 0) + int(count)
        if classes or "other" in raw:
            return _class_stats(classes, int(raw.get("other", 0)))
        if "count" in raw:
            count = int(raw["count"])
            return TrackerStats(count=count, min=float(raw["min"]), max=float(raw["max"]),
                                mean=float(raw["sum"]) / count)
        return TrackerStats()

    # -- logs ---------------------------------------------------------------------------------

    def add_logs(self, api: str, lines: list[tuple[str, str]]) -> None:
        """Append (replica, line) pairs to the API's log stream (the newest
        :data:`LOG_LINES_KEPT` are kept, each cut to :data:`LOG_LINE_CHARS`)."""
        pipe = self.store.pipeline(transaction=False)
        for replica, line in lines:
            entry = {"replica": replica, "line": cut_text(line, LOG_LINE_CHARS)}
            pipe.xadd(keys.logs(api), entry, maxlen=LOG_LINES_KEPT, approximate=True)
        pipe.execute()

    def read_logs(self, api: str, after: str = "0", block: float | None = None,
                  count: int = 1000) -> list[LogLine]:
        """Log lines after id ``after``; wait up to ``block`` seconds for one."""
        block_ms = None if block is None else int(block * 1000)
        raw = self.redis.xread({keys.logs(api): after}, count=count, block=block_ms)
        return [_log_line(entry_id, entry)
                for _, entries in raw or [] for entry_id, entry in entries]

    def last_logs(self, api: str, count: int) -> list[LogLine]:
        """The newest ``count`` log lines, oldest first."""
        if count <= 0:
            return []
        raw = self.redis.xrevrange(keys.logs(api), count=count)
        return [_log_line(entry_id, entry) for entry_id, entry in reversed(raw)]


def _log_line(entry_id: bytes, entry: dict[bytes, bytes]) -> LogLine:
    return LogLine(entry_id.decode(), entry[b"replica"].decode(), entry[b"line"].decode())


def _class_stats(classes: dict[str, int], other: int) -> TrackerStats:
    """Most frequent first, at most :data:`TRACKER_CLASSES_KEPT` (the rest joins "other")."""
    ranked = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))
    other += sum(count for _, count in ranked[TRACKER_CLASSES_KEPT:])
    return TrackerStats(classes=dict(ranked[:TRACKER_CLASSES_KEPT]), other=other)


def cut_label(label: str) -> str:
    """``label``, cut to :data:`TRACKER_LABEL_CHARS` characters ending in "…" when longer."""
    if len(label) <= TRACKER_LABEL_CHARS:
        return label
    return label[:TRACKER_LABEL_CHARS - 1] + "…"


def cut_text(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"
