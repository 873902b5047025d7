"""What ``inferq get`` shows: one row per API (or one API in detail, or the hosts)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from inferq.configs import redact_url
from inferq.errors import UnknownAPI
from inferq.registry import (
    ApiState,
    ApiStatus,
    Capacity,
    DeployedApi,
    Registry,
    ReplicaRecord,
    ReplicaStatus,
)
from inferq.registry.telemetry import TRACKER_CLASSES_KEPT, cut_label, cut_text
from inferq.streams import Streams

TRACKER_ROWS_SHOWN = 20  # classes listed by `inferq get API_NAME`
LINES_SHOWN = 8  # of an error: the last ones
LINE_CHARS_SHOWN = 300


def api_status(deployed: DeployedApi, replicas: list[ReplicaRecord],
               judged: ApiState | None) -> ApiStatus:
    """The API's Cortex status: the scaler's judgement, else what its replicas say."""
    if judged is not None:
        return judged.status
    statuses = {r.status for r in replicas if r.version == deployed.version}
    for replica, api in ((ReplicaStatus.ERROR, ApiStatus.ERROR),
                         (ReplicaStatus.LIVE, ApiStatus.LIVE),
                         (ReplicaStatus.CREATING, ApiStatus.CREATING)):
        if replica in statuses:
            return api
    return ApiStatus.PENDING


def snapshot(registry: Registry, api: str | None = None) -> list[dict[str, Any]]:
    """One row per deployed API (or only ``api``), as plain data (``--output json``)."""
    if api is not None:
        deployed = registry.deployments.api(api)
        if deployed is None:
            raise UnknownAPI(f'no API named "{api}" is deployed (see `inferq get`)')
        apis = [deployed]
    else:
        apis = registry.deployments.apis()
    rows = [_row(registry, deployed, detail=api is not None) for deployed in apis]
    if api is None:
        deployed_names = {d.name for d in apis}
        rows += [
            _stopping_row(registry, name)
            for name in registry.replicas.apis_with_replicas() if name not in deployed_names
        ]
    return rows


def _stopping_row(registry: Registry, name: str) -> dict[str, Any]:
    """A deleted API whose replicas still finish what they hold."""
    replicas = registry.replicas.of(name)
    return {
        "api": name, "deployment": None, "status": ApiStatus.STOPPING,
        "reason": f"deleted; {len(replicas)} replica(s) finishing their requests",
        "up_to_date": 0, "requested": 0,
        "last_update": max((r.updated_at for r in replicas), default=0),
        "avg_latency": None, "2xx": 0, "4xx": 0, "5xx": 0, "predictions": 0,
        "prediction_errors": 0, "hosts": _hosts(replicas),
        "endpoint": None, "version": None,
    }


def _row(registry: Registry, deployed: DeployedApi, *, detail: bool) -> dict[str, Any]:
    name = deployed.name
    replicas = registry.replicas.of(name)
    judged = registry.replicas.status(name)
    stats = registry.telemetry.request_stats(name)
    row: dict[str, Any] = {
        "api": name,
        "deployment": deployed.api.deployment,
        "status": api_status(deployed, replicas, judged),
        "reason": judged.reason if judged else None,
        "up_to_date": sum(1 for r in replicas
                          if r.version == deployed.version and r.status == ReplicaStatus.LIVE),
        "requested": judged.requested if judged else deployed.api.compute.init_replicas,
        "last_update": deployed.updated_at,
        "avg_latency": stats.avg_latency,
        "2xx": stats.ok,
        "4xx": stats.client_errors,
        "5xx": stats.server_errors,
        "predictions": stats.predictions,
        "prediction_errors": stats.prediction_errors,
        "hosts": _hosts(replicas),
        "endpoint": deployed.api.endpoint,
        "version": deployed.version,
        "stream": _stream(registry, deployed),
    }
    if detail:
        tracker = registry.telemetry.tracker_stats(name) if deployed.api.tracker else None
        row["tracker"] = tracker.to_dict() if tracker is not None else None
        usage = registry.replicas.usage(name)
        row["replicas"] = [{**asdict(r), "usage": asdict(usage[r.id]) if r.id in usage else None}
                           for r in replicas]
        row["config"] = deployed.api.to_dict()
    return row


def _stream(registry: Registry, deployed: DeployedApi) -> dict[str, Any] | None:
    """The API's stream and where its consumer stands (None: the API has no stream)."""
    spec = deployed.api.stream
    if spec is None:
        return None
    where = redact_url(spec.url) if spec.url else None
    return {"source": spec.source, "sink": spec.sink, "url": where,
            **Streams(registry).state(deployed.name).to_dict()}


def _hosts(replicas: list[ReplicaRecord]) -> dict[str, int]:
    hosts: dict[str, int] = {}
    for record in replicas:
        if record.status == ReplicaStatus.LIVE:
            hosts[record.host] = hosts.get(record.host, 0) + 1
    return dict(sorted(hosts.items()))


_TABLE = ("api", "status", "up-to-date", "requested", "last update", "avg latency", "2XX",
          "4XX", "5XX", "hosts")
_NUMERIC = {"up-to-date", "requested", "replicas", "avg latency", "2XX", "4XX", "5XX"}
# Narrower and narrower, until the table fits the terminal: without the hosts, without the
# last update, then up-to-date and requested in one column (``inferq get API_NAME`` has all).
_NARROWER = (
    [c for c in _TABLE if c != "hosts"],
    [c for c in _TABLE if c not in ("hosts", "last update")],
    ["api", "status", "replicas", "avg latency", "2XX", "4XX", "5XX"],
)


def render_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """Cortex's table (avg latency and 2XX/4XX/5XX count the gateways' HTTP answers) and
    the hosts, narrowed to fit ``width`` characters when given (see :data:`_NARROWER`)."""
    if not rows:
        return "no APIs are deployed (deploy one with `inferq deploy PROJECT_DIR`)"
    cells = [dict(zip(_TABLE, (
        r["api"],
        r["status"],
        str(r["up_to_date"]),
        str(r["requested"]),
        age(r["last_update"]),
        _latency(r["avg_latency"]),
        _count(r["2xx"]),
        _count(r["4xx"]),
        _count(r["5xx"]),
        ", ".join(f"{h} ({n})" for h, n in r["hosts"].items()) or "-",
    ), strict=True)) for r in rows]
    for row in cells:
        row["replicas"] = f"{row['up-to-date']}/{row['requested']}"
    text = _table(list(_TABLE), cells)
    for columns in _NARROWER:
        if width is None or max(len(line) for line in text.splitlines()) <= width:
            break
        text = _table(columns, cells)
    return text


def _table(columns: list[str], cells: list[dict[str, str]]) -> str:
    lines = [columns] + [[row[c] for c in columns] for row in cells]
    return _columns(lines, numeric={i for i, c in enumerate(columns) if c in _NUMERIC})


def render_api(row: dict[str, Any], gateway: str) -> str:
    from inferq.configs import Api, api_yaml

    lines = [render_table([row]), "", f"endpoint: {gateway}{row['endpoint']}",
             f"predictions: {row['predictions']:,} by every way (HTTP, Python, plain Celery, "
             f"jobs), {row['prediction_errors']:,} failed; 2XX/4XX/5XX and avg latency: HTTP "
             "answers of the gateways"]
    if row["reason"]:
        lines.append("reason:")
        lines.extend(_error_lines(row["reason"]))
    if row["stream"]:
        stream = row["stream"]
        lines += ["", f"stream: {stream['source']} -> {stream['sink']}"
                      + (f" on {stream['url']}" if stream["url"] else "")
                      + f" (group inferq:{row['api']}; failed entries also in "
                        f"{stream['sink']}:failed)"]
        lines += ["  " + line for line in render_streams([row]).splitlines()]
        if not stream["consumer"]:
            lines.append("  no consumer reported in the last seconds (is a scaler running?)")
    lines.extend(_tracker_lines(row["tracker"], row["config"].get("tracker")))
    for replica in row["replicas"]:
        gpus = f", gpu {','.join(map(str, replica['gpus']))}" if replica.get("gpus") else ""
        detail = f" ({replica['detail']})" if replica.get("detail") else ""
        lines.append(
            f"replica {replica['id']}: {replica['status']}{detail}{gpus}{_usage(replica)}"
        )
        if replica.get("error"):
            lines.extend(_error_lines(replica["error"]))
    lines += ["", "configuration:", api_yaml(Api.from_dict(row["config"])).rstrip()]
    return "\n".join(lines)


def _error_lines(text: str) -> list[str]:
    """The end of an error (of a traceback: where it was raised, and what), indented."""
    return ["  " + cut_text(line, LINE_CHARS_SHOWN) for line in text.splitlines()[-LINES_SHOWN:]]


def _usage(replica: dict[str, Any]) -> str:
    """Memory (each replica holds its own copy of the model) and CPU, as last sampled."""
    usage = replica.get("usage") or {}
    parts = []
    if usage.get("rss"):
        parts.append(f"rss {usage['rss'] / 2**20:.0f}Mi")
    if usage.get("cpu") is not None:
        parts.append(f"cpu {usage['cpu']:.0f}m")
    return f" ({', '.join(parts)})" if parts else ""


def _tracker_lines(stats: dict[str, Any] | None, tracker: dict[str, Any] | None) -> list[str]:
    if tracker is None:
        return []
    lines = ["", f"tracker ({tracker['model_type']}):"]
    if not stats:
        return [*lines, "  no predictions tracked yet"]
    if "classes" in stats:
        table = _columns(_class_rows(stats["classes"], stats.get("other", 0)), numeric={1, 2})
        return lines + ["  " + line for line in table.splitlines()]
    summary = (f"  count {_count(stats['count'])}  min {stats['min']:.6g}  "
               f"max {stats['max']:.6g}  avg {stats['mean']:.6g}")
    return [*lines, summary]


def _class_rows(classes: dict[str, int], other: int) -> list[tuple[str, str, str]]:
    """The most frequent classes, then one row for the rest and one for "other": a tracker
    of 100 classes stays a screenful (``--output json`` has every count)."""
    total = sum(classes.values()) + other
    ranked = list(classes.items())  # most frequent first

    def row(label: str, count: int) -> tuple[str, str, str]:
        return label, _count(count), f"{100 * count / total:.1f}%"

    rows = [("class", "count", "share")]
    rows += [row(cut_label(_printable(label)), n) for label, n in ranked[:TRACKER_ROWS_SHOWN]]
    rest = ranked[TRACKER_ROWS_SHOWN:]
    if rest:
        rows.append(row(f"({len(rest)} more classes)", sum(n for _, n in rest)))
    if other:
        rows.append(row(f"(other: past the first {TRACKER_CLASSES_KEPT} classes)", other))
    return rows


def _printable(label: str) -> str:
    """A label on one table row: newlines, tabs and other control characters escaped."""
    if label.isprintable():
        return label
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in label)


def host_rows(registry: Registry) -> list[dict[str, Any]]:
    """Every registered host with its capacity, what it runs and its heartbeat's age."""
    now = registry.store.now()
    leader = registry.hosts.leader()
    return [{
        "host": name,
        "capacity": record.capacity.to_dict(),
        "replicas": record.replicas,
        "heartbeat_age": max(0.0, now - record.heartbeat),
        "leader": leader == name,
    } for name, record in sorted(registry.hosts.all().items())]


def render_hosts(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no scaler is running (start one with `inferq scaler` or `inferq up`)"
    from inferq.configs import format_cpu

    header = ("host", "cpu", "mem", "gpus", "replicas", "heartbeat")
    lines = [header]
    for r in rows:
        capacity = Capacity.from_dict(r["capacity"])
        lines.append((
            r["host"] + (" (leader)" if r["leader"] else ""),
            format_cpu(capacity.cpu),
            f"{capacity.mem / 2**30:.1f}Gi",
            str(capacity.gpu_count),
            ", ".join(f"{api} ({n})" for api, n in sorted(r["replicas"].items())) or "-",
            f"{r['heartbeat_age']:.1f}s ago",
        ))
    return _columns(lines, numeric={1, 3})


def _columns(lines: Sequence[Sequence[str]], numeric: set[int]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric and n else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for n, line in enumerate(lines)
    )


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _count(value: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if value >= size * 10:
            return f"{value / size:.0f}{unit}"
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def age(timestamp: float) -> str:
    seconds = max(0, int(time.time() - timestamp))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def render_streams(rows: list[dict[str, Any]]) -> str:
    """The APIs' streams: lag (entries added, not answered yet), rate, counts, last entry."""
    header = ("stream", "api", "lag", "rate", "answered", "failed", "last entry")
    lines = [header] + [
        (
            s["source"], r["api"],
            "-" if s["lag"] is None else _count(s["lag"]) + ("+" if s["lag_at_least"] else ""),
            f"{s['rate']:.0f}/s" if s["rate"] is not None else "-",
            _count(s["answered"]), _count(s["failed"]),
            f"{s['last_id']} ({age(s['last_at'])} ago)" if s["last_id"] and s["last_at"]
            else "-",
        )
        for r in rows if (s := r.get("stream"))
    ]
    return _columns(lines, numeric={2, 3, 4, 5}) if len(lines) > 1 else ""


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    """Batch jobs as ``inferq batch get`` (and ``inferq get``, for running ones) lists them."""
    if not jobs:
        return "no batch jobs (submit one with `inferq batch submit API_NAME INPUT`)"
    header = ("job id", "api", "status", "done", "failed", "total", "rate", "started", "output")
    lines = [header] + [
        (
            j["id"], j["api"], j["status"] + (" (stopping)" if j["stopping"] else ""),
            _count(j["done"]), _count(j["failed"]),
            _count(j["total"]) if j["total"] is not None else "?",
            f"{j['rate']:.0f}/s" if j["rate"] else "-",
            f"{age(j['started_at'])} ago" if j["started_at"] else "-",
            j["output"],
        )
        for j in jobs
    ]
    return _columns(lines, numeric={3, 4, 5, 6})


def render_job(job: dict[str, Any]) -> str:
    """One batch job in full (``inferq batch get JOB_ID``)."""
    total = job["total"] if job["total"] is not None else "? (counted once read)"
    fields = [
        ("job", job["id"]), ("api", job["api"]),
        ("status", job["status"] + (" (stopping)" if job["stopping"] else "")),
        ("samples", f"{job['done']} done, {job['failed']} failed, of {total}"),
        ("rate", f"{job['rate']:.0f} samples/s" if job["rate"] else "-"),
        ("created", f"{age(job['created_at'])} ago"),
        ("started", f"{age(job['started_at'])} ago" if job["started_at"] else "-"),
        ("ended", f"{age(job['ended_at'])} ago" if job["ended_at"] else "-"),
        ("driven on", (job["driven_on"] + " (the job reads or writes local files there)")
         if job["driven_on"] else "any host (S3 only)"),
        ("input", job["input"]), ("output", job["output"]),
        ("dead letter", job["dead_letter"] or "-"),
    ]
    if job["error"]:
        fields.append(("error", job["error"]))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in fields)
