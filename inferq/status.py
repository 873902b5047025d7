"""What ``inferq get`` shows: one row per API, from the registry."""

from __future__ import annotations

import time
from typing import Any

from inferq.registry import DeployedApi, Registry
from inferq.errors import UnknownAPI


def api_status(deployed: DeployedApi, replicas: list[dict[str, Any]],
               judged: dict[str, Any] | None) -> str:
    """The API's Cortex status: the scaler's judgement, else what its replicas say."""
    if judged is not None:
        return judged["status"]
    current = [r for r in replicas if r.get("version") == deployed.version]
    if any(r["status"] == "error" for r in current):
        return "error"
    if any(r["status"] == "live" for r in current):
        return "live"
    if any(r["status"] == "creating" for r in current):
        return "creating"
    return "pending"


def snapshot(registry: Registry, api: str | None = None) -> list[dict[str, Any]]:
    """One row per deployed API (or only ``api``), as plain data (``--output json``)."""
    if api is not None:
        deployed = registry.api(api)
        if deployed is None:
            raise UnknownAPI(f'no API named "{api}" is deployed')
        apis = [deployed]
    else:
        apis = registry.apis()
    rows = []
    for deployed in apis:
        replicas = registry.replicas(deployed.name)
        judged = registry.status(deployed.name)
        up_to_date = sum(
            1 for r in replicas if r.get("version") == deployed.version and r["status"] == "live"
        )
        requested = (judged or {}).get("requested", deployed.api.compute.init_replicas)
        rows.append(
            {
                "api": deployed.name,
                "deployment": deployed.api.deployment,
                "status": api_status(deployed, replicas, judged),
                "reason": (judged or {}).get("reason"),
                "up_to_date": up_to_date,
                "requested": requested,
                "last_update": deployed.updated_at,
                "endpoint": deployed.api.endpoint,
                "version": deployed.version,
                "replicas": replicas,
                "config": deployed.api.to_dict(),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no APIs are deployed (deploy one with `inferq deploy PROJECT_DIR`)"
    header = ("api", "status", "up-to-date", "requested", "last update")
    lines = [header] + [
        (
            r["api"],
            r["status"],
            str(r["up_to_date"]),
            str(r["requested"]),
            _age(r["last_update"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
        for line in lines
    )


def render_api(row: dict[str, Any], gateway: str) -> str:
    import yaml

    lines = [render_table([row]), "", f"endpoint: {gateway}{row['endpoint']}"]
    if row["reason"]:
        lines.append(f"reason: {row['reason']}")
    for replica in row["replicas"]:
        error = replica.get("error")
        lines.append(f"replica {replica['id']}: {replica['status']}")
        if error:
            lines.extend("  " + line for line in error.splitlines()[-8:])
    lines += ["", "configuration:", yaml.safe_dump(row["config"], sort_keys=False).rstrip()]
    return "\n".join(lines)


def _age(timestamp: float) -> str:
    seconds = max(0, int(time.time() - timestamp))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
