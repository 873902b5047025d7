"""Replicas' liveness signals, for a controller that does not start them (Kubernetes).

``inferq up``'s scaler knows its replicas by their processes. When Kubernetes runs them
(``inferq controller``), nobody waits on their processes, so each replica's supervisor renews
a key with a time to live (``keys.alive``); a replica whose key lapsed is dead (SIGKILL, node
lost), and the controller puts back what it held. The same round trip carries the
controller's request that the replica reload the deployed version (``keys.reload``).
"""

from __future__ import annotations

from collections.abc import Iterable

from inferq import keys
from inferq.registry.store import Store


class Liveness:
    """Liveness signals and reload requests of replicas."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    def renew(self, api: str, replica: str, ttl: float = keys.ALIVE_TTL_SECONDS) -> bool:
        """Renew ``replica``'s signal for ``ttl`` seconds; True when the controller asked it to
        reload (the request is taken: it is answered once)."""
        pipe = self.store.pipeline(transaction=True)
        pipe.set(keys.alive(api, replica), "1", px=max(1, int(ttl * 1000)))
        pipe.get(keys.reload(api, replica))  # GET and DEL in MULTI: GETDEL needs Redis 6.2
        pipe.delete(keys.reload(api, replica))
        _, wanted, _ = pipe.execute()
        return wanted is not None

    def end(self, api: str, replica: str) -> None:
        """The replica stopped: its signal goes at once (not when it lapses)."""
        self.redis.delete(keys.alive(api, replica), keys.reload(api, replica))

    def alive(self, api: str, replicas: Iterable[str]) -> set[str]:
        """Those of ``replicas`` whose signal has not lapsed."""
        ids = list(replicas)
        if not ids:
            return set()
        pipe = self.store.pipeline(transaction=False)
        for replica in ids:
            pipe.exists(keys.alive(api, replica))
        return {r for r, found in zip(ids, pipe.execute(), strict=True) if found}

    def ask_reload(self, api: str, replica: str) -> None:
        """Ask ``replica`` to restart its serving process, which loads the deployed version
        (taken at its next renewal)."""
        self.redis.set(keys.reload(api, replica), "1", ex=keys.RELOAD_TTL_SECONDS)
