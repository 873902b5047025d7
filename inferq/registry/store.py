"""The one connection every part of the registry shares, and what they all need of it."""

from __future__ import annotations

import threading
from dataclasses import fields
from typing import Any

import redis

from inferq.configs import redact_url
from inferq.errors import BrokerUnavailable

# A lease's holder keeps it with its own token; only the holder renews or releases it.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class Leases:
    """Leases of ``seconds`` held by a token (a job's driver, a stream's consumer): taken
    when free, renewed and released only by their holder."""

    def __init__(self, redis_client: Any, seconds: float) -> None:
        self.redis = redis_client
        self.ms = int(seconds * 1000)
        self._renew = redis_client.register_script(_LEASE_RENEW)
        self._release = redis_client.register_script(_LEASE_RELEASE)

    def take(self, key: str, token: str) -> bool:
        """Take the lease at ``key`` if nobody holds it."""
        return bool(self.redis.set(key, token, nx=True, px=self.ms))

    def renew(self, key: str, token: str) -> bool:
        """Keep the lease; False when it was lost (another holder has it now)."""
        return self._renew(keys=[key], args=[token, self.ms]) == 1

    def release(self, key: str, token: str) -> None:
        self._release(keys=[key], args=[token])


class Store:
    """A Redis connection pool and this thread's reusable pipelines.

    Parameters
    ----------
    url:
        A Redis URL (``redis://host:port/db``), usually the broker's.
    socket_timeout:
        Seconds a command may take (None: no limit).
    max_connections:
        Connections open at most; a thread past them waits for a free one instead of failing
        with redis-py's "Too many connections".
    """

    def __init__(self, url: str, *, socket_timeout: float | None = 10.0,
                 max_connections: int = 256) -> None:
        self.url = url
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout or 30,
            socket_timeout=socket_timeout, socket_connect_timeout=5, health_check_interval=30,
        )
        # Any: redis-py types every reply ``bytes | str`` (it cannot know decode_responses);
        # inferq's are always bytes.
        self.redis: Any = redis.Redis(connection_pool=pool)
        self._local = threading.local()  # each thread's reusable pipelines
        self._returned: dict[str, int] = {}  # key -> items pop_all returned, trimmed next

    def pipeline(self, *, transaction: bool) -> Any:
        """A pipeline of this thread's own, reused: a new one copies redis-py's ~200 response
        callbacks, which costs as much CPU as the round trip it makes (the request path)."""
        pipes = self._local.__dict__.setdefault("pipes", {})
        pipe = pipes.get(transaction)
        if pipe is None:
            pipe = pipes[transaction] = self.redis.pipeline(transaction=transaction)
        elif pipe.command_stack:  # left over by a build that failed: never send it
            pipe.reset()
        return pipe

    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless Redis answers."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"the broker at {self.safe_url} does not answer: {exc}") from None

    @property
    def safe_url(self) -> str:
        """The broker URL without its password, for logs and messages."""
        return redact_url(self.url)

    def now(self) -> float:
        """Redis's clock: one clock for every host's heartbeats and failures."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def pop_all(self, key: str, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` seconds for the list ``key`` to hold something; take and
        return all it holds, in one round trip.

        Nothing is lost to a connection that breaks midway (a broker restart): the wait does
        not remove what it sees (``BLMOVE key key LEFT LEFT`` puts the first item back where
        it was), and what one call returned is trimmed off the list by the next call on
        ``key`` (``LTRIM``, so items pushed meanwhile stay), once its caller had it. At worst
        an item is returned twice (every receiver ignores an answer it had). One thread
        reads a given key."""
        pipe = self.pipeline(transaction=False)
        returned = self._returned.pop(key, 0)
        if returned:
            pipe.ltrim(key, returned, -1)
        # Redis runs a connection's commands in order: LRANGE waits for BLMOVE to return.
        pipe.blmove(key, key, blocking(timeout), "LEFT", "LEFT")
        pipe.lrange(key, 0, -1)
        items = pipe.execute()[-1]
        if items:
            self._returned[key] = len(items)
        return list(items)

    def take_all(self, key: str) -> list[bytes]:
        """Read and empty the list ``key`` in one step."""
        pipe = self.pipeline(transaction=True)  # MULTI: read and empty at once
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        raw, _ = pipe.execute()
        return list(raw)

    def close(self) -> None:
        self.redis.close()


def blocking(seconds: float) -> float:
    """A BLPOP timeout that waits: Redis counts it in whole milliseconds, and one that rounds
    to 0 blocks forever (a request 0.1 ms from its deadline waited out the 10 s socket
    timeout)."""
    return max(round(seconds, 3), 0.01)


def decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    """A hash as Redis returns it, as text."""
    return {k.decode(): v.decode() for k, v in raw.items()}


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (a record written by
    another version of inferq may have more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
