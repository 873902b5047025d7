"""A stream consumer's lease and what it reports, kept in the broker (``keys.stream_state``).

The consumer of an API's stream runs wherever a scaler holds its lease; it reports its
counts, its source's lag and its last entry here, so that the scalers (the lag is a signal,
as queued requests are), the gateways (``/metrics``) and ``inferq get`` read them without
reaching the stream's own Redis (and its password).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inferq import keys
from inferq.registry import Registry
from inferq.registry.store import Leases, decoded

LEASE_SECONDS = 10.0  # a consumer that stops renewing loses its stream after this
FRESH_SECONDS = 5.0  # a report older than this is no signal (the consumer is gone)


@dataclass(frozen=True)
class StreamState:
    """What an API's stream consumer last reported."""

    api: str
    answered: int = 0  # entries answered with a prediction
    failed: int = 0  # entries answered with an error (in the dead letter too)
    dead: int = 0  # ... of which put there unanswered: delivered too often, or trimmed away
    lag: int | None = None  # entries added and not answered yet
    lag_at_least: bool = False  # counted only up to a limit (Redis before 7)
    undelivered: int | None = None  # ... of which not read by the consumer yet
    unsent: int = 0  # ... read by the consumer and not sent to the replicas yet
    rate: float | None = None  # entries answered per second, lately
    last_id: str | None = None  # the newest entry answered
    last_at: float | None = None  # when (Unix time)
    updated_at: float | None = None  # when this was reported
    consumer: str | None = None  # who reports: <host>-<pid>

    @property
    def fresh(self) -> bool:
        return self.updated_at is not None and time.time() - self.updated_at < FRESH_SECONDS

    def to_dict(self) -> dict[str, object]:
        return {"api": self.api, "answered": self.answered, "failed": self.failed,
                "dead": self.dead, "lag": self.lag, "lag_at_least": self.lag_at_least,
                "rate": self.rate, "last_id": self.last_id, "last_at": self.last_at,
                "consumer": self.consumer if self.fresh else None}


class Streams:
    """The stream consumers' leases and reports."""

    def __init__(self, registry: Registry) -> None:
        self.store = registry.store
        self.redis = registry.redis
        self._leases = Leases(self.redis, LEASE_SECONDS)

    def claim(self, api: str, token: str) -> bool:
        """Take the lease of ``api``'s stream if no consumer holds it."""
        return self._leases.take(keys.stream_consumer(api), token)

    def renew(self, api: str, token: str) -> bool:
        """Keep the lease; False when it was lost (another consumer runs now)."""
        return self._leases.renew(keys.stream_consumer(api), token)

    def release(self, api: str, token: str) -> None:
        self._leases.release(keys.stream_consumer(api), token)

    def report(self, api: str, *, answered: int, failed: int, dead: int, last_id: str | None,
               undelivered: int | None, unsent: int, lag: int | None, at_least: bool,
               rate: float | None, consumer: str) -> None:
        """Add the counts since the last report, and say where the stream stands now."""
        now = time.time()
        fields: dict[str, object] = {"updated_at": now, "consumer": consumer,
                                     "lag": "" if lag is None else lag,
                                     "undelivered": "" if undelivered is None else undelivered,
                                     "unsent": unsent,
                                     "lag_at_least": int(at_least),
                                     "rate": "" if rate is None else round(rate, 3)}
        if last_id is not None:
            fields.update(last_id=last_id, last_at=now)
        pipe = self.store.pipeline(transaction=True)
        key = keys.stream_state(api)
        for name, count in (("answered", answered), ("failed", failed), ("dead", dead)):
            if count:
                pipe.hincrby(key, name, count)
        pipe.hset(key, mapping=fields)
        pipe.execute()

    def state(self, api: str) -> StreamState:
        data = decoded(self.redis.hgetall(keys.stream_state(api)))

        def count(name: str) -> int | None:
            return int(data[name]) if data.get(name) else None

        def seconds(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        return StreamState(
            api, answered=count("answered") or 0, failed=count("failed") or 0,
            dead=count("dead") or 0, lag=count("lag"),
            lag_at_least=data.get("lag_at_least") == "1", undelivered=count("undelivered"),
            unsent=count("unsent") or 0,
            rate=seconds("rate"), last_id=data.get("last_id") or None,
            last_at=seconds("last_at"), updated_at=seconds("updated_at"),
            consumer=data.get("consumer"),
        )

    def unseen(self, api: str) -> int:
        """Entries of ``api``'s stream that are neither queued for its replicas nor held by
        one (not read by the consumer yet, or read and not sent), as the scaler counts them
        beside queued requests (the queue counts those sent); 0 when no consumer reported
        lately."""
        state = self.state(api)
        return (state.undelivered or 0) + state.unsent if state.fresh else 0
