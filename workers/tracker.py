"""Cortex's prediction tracker: count predictions per class, or keep regression stats.

``tracker: {model_type: classification, key: label}`` counts the value at ``key`` of each
prediction (the prediction itself when it is not an object); ``model_type: regression`` keeps
count, min, max and mean of the float values. Every prediction a replica makes is tracked,
whichever way its request arrived. A prediction that cannot be tracked is logged once per
reason and never fails the request.

Classes are bounded (see :meth:`inferq.registry.Telemetry.track_commands`): a label is kept
to 64 characters, an API to 100 classes, and labels past those are counted together as
"other", so a predictor that answers free text cannot fill Redis or ``inferq get``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

from inferq.configs import Tracker
from inferq.messages import Command
from inferq.registry import Telemetry

log = logging.getLogger("inferq.tracker")


def tracked_value(tracker: Tracker, prediction: Any) -> tuple[str | float | None, str | None]:
    """(value to track, None) or (None, why it cannot be tracked)."""
    value = prediction
    if isinstance(prediction, dict):
        if tracker.key is None:
            return None, "the prediction is an object and the tracker has no key"
        if tracker.key not in prediction:
            return None, f'the prediction has no key "{tracker.key}"'
        value = prediction[tracker.key]
    elif tracker.key is not None:
        return None, (f'the tracker\'s key is "{tracker.key}" but the prediction is a '
                      f"{type(prediction).__name__}, not an object")
    if tracker.model_type == "classification":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"a classification is a string or an integer, not {type(value).__name__}"
        return str(value), None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"a regression value is a finite number, not {value!r:.40}"
    return float(value), None


class PredictionTracker:
    """Tracks one API's predictions (see the module doc): counted here, and sent to the
    registry with the replica's acknowledgement of the message (:meth:`take_commands`), so a
    batch of 64 samples costs no round trip of its own, let alone 64."""

    def __init__(self, api: str, tracker: Tracker) -> None:
        self.api = api
        self.tracker = tracker
        self._reported: set[str] = set()
        self._classes: Counter[str] = Counter()
        self._values: list[float] = []

    def track(self, prediction: Any) -> None:
        value, problem = tracked_value(self.tracker, prediction)
        if problem is not None:
            if problem not in self._reported:
                self._reported.add(problem)
                log.warning('api "%s": tracker: %s (logged once)', self.api, problem)
            return
        if isinstance(value, str):
            self._classes[value] += 1
        elif value is not None:
            self._values.append(value)

    def take_commands(self) -> list[Command]:
        """The Redis commands recording what was tracked since the last call."""
        if not self._classes and not self._values:
            return []
        commands = Telemetry.track_commands(self.api, self._classes, self._values)
        self._classes, self._values = Counter(), []
        return commands
