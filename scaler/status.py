"""An API's Cortex status, judged by the leading scaler from what it observed.

Each status appears exactly when its meaning holds:

=========================  ===================================================================
``compute unavailable``    some wanted replicas fit on no host (the reason says what is short)
``error``                  a replica of it failed (import, ``init()``, crash) and the API has
                           not got all its replicas live since
``error (out of memory)``  the same, because a replica used more than its ``mem``
``error (requirements)``   the same, because its requirements.txt could not be installed
``live``                   every wanted replica is live, or some are and more are coming
``creating``               replicas are starting (installing requirements, ``init()``), none
                           is live yet
``pending``                replicas are wanted but none has started yet
``stopped``                no replica is wanted (``min_replicas: 0`` and no request waiting)
=========================  ===================================================================

(``stopping`` is reported for a deleted deployment while its replicas drain.)
"""

from __future__ import annotations

from inferq.registry import ApiStatus, Failure, ReplicaRecord, ReplicaStatus

REASON_LINES = 6  # of a traceback, in ``inferq get``


def judge(version: str, desired: int, unplaced: tuple[int, str] | None,
          replicas: list[ReplicaRecord], failures: list[Failure]) -> tuple[ApiStatus, str | None]:
    """(status, reason) of one API; ``replicas`` are its replica records on live hosts,
    ``failures`` its failures, oldest first."""
    live = [r for r in replicas if r.status == ReplicaStatus.LIVE]
    up_to_date = [r for r in live if r.version == version]
    if unplaced is not None:
        count, reason = unplaced
        return ApiStatus.COMPUTE_UNAVAILABLE, f"{count} replica(s) cannot be placed: {reason}"
    if failures and len(up_to_date) < desired:
        failure = failures[-1]
        return failure.kind.status, _last_lines(failure.message)
    if desired == 0 and not replicas:
        return ApiStatus.STOPPED, "scaled to zero: a queued request starts a replica"
    if live:
        return ApiStatus.LIVE, None
    creating = [r for r in replicas if r.status == ReplicaStatus.CREATING]
    if creating:
        return ApiStatus.CREATING, next((r.detail for r in creating if r.detail), None)
    return ApiStatus.PENDING, None


def _last_lines(message: str) -> str:
    return "\n".join(message.strip().splitlines()[-REASON_LINES:])
