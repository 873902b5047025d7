"""The hosts: each scaler's heartbeat and capacity, which one leads, and the leader's plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from inferq import keys
from inferq.configs import format_cpu, format_mem
from inferq.registry.store import Store

# Takes or keeps the lease of KEYS[1] for ARGV[1] (ARGV[2] ms).
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Capacity:
    """What a host offers replicas: cpu in millicores, mem in bytes, the GPU indices it lends."""

    cpu: int
    mem: int
    gpus: tuple[int, ...] = ()
    gpu_mem: tuple[int, ...] = ()  # bytes per GPU, in the order of ``gpus``; () if unknown

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "mem": self.mem, "gpus": list(self.gpus),
                "gpu_mem": list(self.gpu_mem)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capacity:
        return cls(cpu=int(data["cpu"]), mem=int(data["mem"]),
                   gpus=tuple(int(i) for i in data.get("gpus", ())),
                   gpu_mem=tuple(int(m) for m in data.get("gpu_mem", ())))

    def describe(self) -> str:
        """One line for logs and ``inferq get``: ``cpu 2, mem 23.4Gi, gpus 2 (0,1)``."""
        gpus = f"gpus {self.gpu_count}"
        if self.gpus:
            gpus += f" ({','.join(str(i) for i in self.gpus)})"
        return f"cpu {format_cpu(self.cpu)}, mem {rounded_mem(self.mem)}, {gpus}"


def rounded_mem(size: int) -> str:
    """``format_mem``'s exact form when short ("8Gi"), else one decimal ("23.4Gi")."""
    exact = format_mem(size)
    if len(exact) <= 5:
        return exact
    for suffix, power in (("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:.1f}{suffix}"
    return exact


@dataclass(frozen=True)
class HostRecord:
    """A host as its scaler last reported it."""

    host: str
    capacity: Capacity
    replicas: dict[str, int]  # API -> replicas running there
    heartbeat: float  # Redis's clock

    @classmethod
    def from_json(cls, raw: str | bytes) -> HostRecord:
        data = json.loads(raw)
        return cls(data["host"], Capacity.from_dict(data["capacity"]),
                   dict(data.get("replicas", {})), float(data["heartbeat"]))


@dataclass(frozen=True)
class Plan:
    """The leader's decision: replicas per API and host, how many each API wants, and per API
    how many replicas fit nowhere and why."""

    hosts: dict[str, dict[str, int]] = field(default_factory=dict)  # api -> host -> replicas
    desired: dict[str, int] = field(default_factory=dict)
    unplaced: dict[str, tuple[int, str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"hosts": self.hosts, "desired": self.desired,
                           "unplaced": {a: list(u) for a, u in self.unplaced.items()}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Plan:
        data = json.loads(raw)
        return cls(data.get("hosts", {}), data.get("desired", {}),
                   {a: (int(n), str(why)) for a, (n, why) in data.get("unplaced", {}).items()})


class Hosts:
    """Heartbeats, leadership and the plan."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self._lead = self.redis.register_script(_LEAD)
        self._resign = self.redis.register_script(_RESIGN)

    def heartbeat(self, host: str, capacity: Capacity, replicas: dict[str, int]) -> None:
        """Say that ``host`` is alive, what it offers and what it runs."""
        record = {"capacity": capacity.to_dict(), "replicas": replicas, "host": host,
                  "heartbeat": self.store.now()}
        self.redis.hset(keys.hosts(), host, json.dumps(record))

    def all(self) -> dict[str, HostRecord]:
        raw = self.redis.hgetall(keys.hosts())
        return {k.decode(): HostRecord.from_json(v) for k, v in raw.items()}

    def remove(self, host: str) -> None:
        self.redis.hdel(keys.hosts(), host)

    def lead(self, host: str, ttl: float) -> bool:
        """Take or keep the scalers' leadership for ``ttl`` seconds; True if ``host`` leads."""
        return bool(self._lead(keys=[keys.leader()], args=[host, int(ttl * 1000)]))

    def resign(self, host: str) -> None:
        self._resign(keys=[keys.leader()], args=[host])

    def leader(self) -> str | None:
        raw = self.redis.get(keys.leader())
        return raw.decode() if raw else None

    def set_plan(self, plan: Plan) -> None:
        self.redis.set(keys.plan(), plan.to_json())

    def plan(self) -> Plan:
        raw = self.redis.get(keys.plan())
        return Plan.from_json(raw) if raw else Plan()
