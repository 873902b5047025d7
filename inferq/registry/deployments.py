"""What is deployed: deployments, their APIs with versions, and the bundles replicas run."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from inferq import keys
from inferq.configs import Api, Deployment
from inferq.errors import DeployError
from inferq.registry.store import Store

LOCK_SECONDS = 30  # a deploy or delete holds the deploy lock at most this long


class ApiChange(StrEnum):
    """What a deploy did to one API."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class DeployedApi:
    """An API as deployed: its spec, its version and the bundle its replicas run."""

    api: Api
    version: str
    bundle: str
    updated_at: float

    @property
    def name(self) -> str:
        return self.api.name

    def to_json(self) -> str:
        return json.dumps({"spec": self.api.to_dict(), "version": self.version,
                           "bundle": self.bundle, "updated_at": self.updated_at},
                          sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeployedApi:
        data = json.loads(raw)
        return cls(api=Api.from_dict(data["spec"]), version=data["version"],
                   bundle=data["bundle"], updated_at=data["updated_at"])


@dataclass(frozen=True)
class DeploymentRecord:
    """A deployment: its name, the bundle it was deployed from and its APIs."""

    name: str
    bundle: str
    apis: tuple[str, ...]
    updated_at: float

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "bundle": self.bundle, "apis": list(self.apis),
                           "updated_at": self.updated_at})

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeploymentRecord:
        data = json.loads(raw)
        return cls(data["name"], data["bundle"], tuple(data["apis"]), data["updated_at"])


@dataclass(frozen=True)
class DeployResult:
    """What a deploy changed: per API, its :class:`ApiChange`; the APIs it removed."""

    deployment: str
    changes: dict[str, ApiChange]
    removed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.removed) or any(c != ApiChange.UNCHANGED for c in self.changes.values())


def api_version(api: Api, bundle: str) -> str:
    """A version that changes whenever the API's spec or any file of its project changes."""
    payload = json.dumps({"spec": api.to_dict(), "bundle": bundle}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


class Deployments:
    """Deployments, deployed APIs and bundles."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    # -- bundles ------------------------------------------------------------------------------

    def put_bundle(self, digest: str, data: bytes) -> None:
        """Store a bundle under its content hash (a no-op when it is already there)."""
        key = keys.bundle(digest)
        self.redis.set(key, data, nx=True)
        self.redis.persist(key)

    def get_bundle(self, digest: str) -> bytes | None:
        return self.redis.get(keys.bundle(digest))

    # -- deployments --------------------------------------------------------------------------

    def deploy(self, deployment: Deployment, bundle: str) -> DeployResult:
        """Record ``deployment`` (whose bundle is already stored) and say what changed.

        An unchanged API keeps its version and ``updated_at``. API names and endpoints are
        unique across deployments: taking one that another deployment owns is refused, and
        nothing is written.
        """
        with self.redis.lock(keys.deploy_lock(), timeout=LOCK_SECONDS,
                             blocking_timeout=LOCK_SECONDS):
            current = {a.name: a for a in self.apis()}
            _check_ownership(deployment, current.values())
            now = time.time()
            changes: dict[str, ApiChange] = {}
            records: dict[str, str] = {}
            for api in deployment.apis:
                version = api_version(api, bundle)
                old = current.get(api.name)
                if old is not None and old.version == version:
                    changes[api.name] = ApiChange.UNCHANGED
                    continue
                changes[api.name] = ApiChange.CREATED if old is None else ApiChange.UPDATED
                records[api.name] = DeployedApi(api, version, bundle, now).to_json()
            previous = self.record(deployment.name)
            removed = tuple(sorted(set(previous.apis) - set(changes)) if previous else ())
            if not records and not removed:
                return DeployResult(deployment.name, changes, removed)
            pipe = self.store.pipeline(transaction=True)
            if records:
                pipe.hset(keys.apis(), mapping=records)
            if removed:
                pipe.hdel(keys.apis(), *removed)
                _forget_counts(pipe, removed)
            pipe.sadd(keys.deployments(), deployment.name)
            record = DeploymentRecord(deployment.name, bundle,
                                      tuple(a.name for a in deployment.apis), now)
            pipe.set(keys.deployment(deployment.name), record.to_json())
            pipe.incr(keys.changes())
            pipe.execute()
            if previous and previous.bundle != bundle:
                self._retire_bundle(previous.bundle)
            return DeployResult(deployment.name, changes, removed)

    def delete(self, name: str) -> list[str]:
        """Remove a deployment and its APIs (and their counts); return the removed API
        names."""
        with self.redis.lock(keys.deploy_lock(), timeout=LOCK_SECONDS,
                             blocking_timeout=LOCK_SECONDS):
            previous = self.record(name)
            if previous is None:
                raise DeployError(f'no deployment named "{name}" is deployed')
            pipe = self.store.pipeline(transaction=True)
            if previous.apis:
                pipe.hdel(keys.apis(), *previous.apis)
                _forget_counts(pipe, previous.apis)
            pipe.srem(keys.deployments(), name)
            pipe.delete(keys.deployment(name))
            pipe.incr(keys.changes())
            pipe.execute()
            self._retire_bundle(previous.bundle)
            return list(previous.apis)

    def record(self, name: str) -> DeploymentRecord | None:
        raw = self.redis.get(keys.deployment(name))
        return DeploymentRecord.from_json(raw) if raw else None

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.smembers(keys.deployments()))

    def apis(self) -> list[DeployedApi]:
        """Every deployed API, by name."""
        raw = self.redis.hgetall(keys.apis())
        return sorted((DeployedApi.from_json(v) for v in raw.values()), key=lambda a: a.name)

    def api(self, name: str) -> DeployedApi | None:
        raw = self.redis.hget(keys.apis(), name)
        return DeployedApi.from_json(raw) if raw else None

    def changes(self) -> int:
        """A number that grows with every deploy and delete (for cheap change detection)."""
        return int(self.redis.get(keys.changes()) or 0)

    def _retire_bundle(self, digest: str) -> None:
        # Keep a replaced bundle a while: replicas of the old version may still start from it.
        if digest not in {a.bundle for a in self.apis()}:
            self.redis.expire(keys.bundle(digest), keys.RETIRED_BUNDLE_TTL_SECONDS)


def _forget_counts(pipe: Any, apis: Iterable[str]) -> None:
    """A deleted API's request counts, tracker and stream counts go with it: deployed again,
    it counts from zero (its logs stay, to read what its replicas said last; its stream's
    consumer group stays, so consuming goes on where it stopped)."""
    for api in apis:
        pipe.delete(keys.stats(api), keys.tracker(api), keys.stream_state(api))


def _check_ownership(deployment: Deployment, current: Iterable[DeployedApi]) -> None:
    problems = []
    for deployed in current:
        if deployed.api.deployment == deployment.name:
            continue
        for api in deployment.apis:
            if api.name == deployed.name:
                problems.append(
                    f'api "{api.name}": the name is taken by deployment '
                    f'"{deployed.api.deployment}" (API names are unique across deployments)'
                )
            elif api.endpoint == deployed.api.endpoint:
                problems.append(
                    f'api "{api.name}": endpoint {api.endpoint} is taken by api '
                    f'"{deployed.name}" of deployment "{deployed.api.deployment}"'
                )
    if problems:
        raise DeployError("\n".join(problems))
