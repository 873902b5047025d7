"""The gateway's Prometheus metrics, and the request counts ``inferq get`` shows.

Request counters and latency histograms live in this process (Prometheus scrapes each
gateway); queue depth, replicas, batch job samples (``inferq_job_samples_total``, counted by
the jobs' drivers) and streams (``inferq_stream_lag``, ``inferq_stream_entries_total``,
reported by their consumers) are read from the registry at scrape time. Counts per
status class and latency sums are also added to the registry once a second, so ``inferq get``
shows the totals of every gateway without a request paying a Redis round trip for them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from inferq import keys
from inferq.errors import InferqError
from inferq.streams import Streams

log = logging.getLogger("inferq.gateway")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FLUSH_SECONDS = 1.0


class GatewayMetrics:
    """Counts and times API requests; renders ``/metrics``."""

    def __init__(self, client) -> None:
        self._client = client
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferq_requests", "API requests by API and status class",
            ["api", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "inferq_request_duration_seconds", "API request latency", ["api"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_RegistryCollector(client))
        self._lock = threading.Lock()
        self._series: set[tuple[str, str]] = set()  # (api, code) observed, see _forget_deleted
        self._pending: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._flusher = threading.Thread(target=self._flush_forever, daemon=True,
                                         name="inferq-stats")
        self._flusher.start()

    def observe(self, api: str, status: int, seconds: float) -> None:
        """Count a request to a deployed API (only those: a label value per unknown endpoint
        would let any caller grow /metrics without bound)."""
        code = f"{status // 100}xx"
        self.requests.labels(api, code).inc()
        self.latency.labels(api).observe(seconds)
        with self._lock:
            self._series.add((api, code))
            stats = self._pending[api]
            stats[code] += 1
            stats["latency_sum"] += seconds
            stats["count"] += 1

    def render(self) -> tuple[bytes, str]:
        self._forget_deleted()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _forget_deleted(self) -> None:
        """Drop the series of deleted APIs: a gateway that lives through many deploys of new
        API names keeps series only for those deployed now."""
        try:
            deployed = {d.name for d in self._client.apis()}
        except InferqError:  # the broker is away: keep everything until it answers
            return
        with self._lock:
            gone = {(api, code) for api, code in self._series if api not in deployed}
            self._series -= gone
        for api, code in gone:
            _remove(self.requests, api, code)
        for api in {api for api, _ in gone}:
            _remove(self.latency, api)

    def _flush_forever(self) -> None:
        while True:
            threading.Event().wait(FLUSH_SECONDS)
            with self._lock:
                pending, self._pending = self._pending, defaultdict(lambda: defaultdict(float))
            if not pending:
                continue
            try:
                self._client.registry.telemetry.add_request_stats(pending)
            except redis.RedisError as exc:
                log.warning("could not record request counts (%s); they are kept", exc)
                with self._lock:
                    for api, stats in pending.items():
                        for key, value in stats.items():
                            self._pending[api][key] += value


def _remove(metric, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # removed already by another scrape
        metric.remove(*labels)


class _RegistryCollector:
    """Queue depth and replicas per API, read from the registry when scraped."""

    def __init__(self, client) -> None:
        self._client = client

    def collect(self):
        depth = GaugeMetricFamily("inferq_queue_depth", "Requests waiting in the API's queue",
                                  labels=["api"])
        replicas = GaugeMetricFamily("inferq_replicas", "Replicas by status",
                                     labels=["api", "status"])
        job_samples = CounterMetricFamily("inferq_job_samples",
                                          "Batch job samples written, by outcome",
                                          labels=["api", "outcome"])
        stream_lag = GaugeMetricFamily("inferq_stream_lag",
                                       "Entries added to the API's stream and not answered yet",
                                       labels=["api"])
        stream_entries = CounterMetricFamily(
            "inferq_stream_entries", "Stream entries answered, by outcome (failed: in the dead "
            "letter too; dead: put there unanswered)", labels=["api", "outcome"])
        try:
            registry = self._client.registry
            for deployed in self._client.apis():
                if deployed.api.stream is not None:
                    state = Streams(registry).state(deployed.name)
                    if state.lag is not None and state.fresh:
                        stream_lag.add_metric([deployed.name], state.lag)
                    for outcome, count in (("answered", state.answered),
                                           ("failed", state.failed), ("dead", state.dead)):
                        stream_entries.add_metric([deployed.name, outcome], count)
                stats = registry.telemetry.request_stats(deployed.name)
                job_samples.add_metric([deployed.name, "completed"], stats.job_samples)
                job_samples.add_metric([deployed.name, "failed"], stats.job_failed)
                depth.add_metric([deployed.name], registry.queues.length(keys.queue(deployed.name)))
                counts: dict[str, int] = defaultdict(int)
                for record in registry.replicas.of(deployed.name):
                    counts[record.status] += 1
                for status, count in sorted(counts.items()):
                    replicas.add_metric([deployed.name, status], count)
        except (redis.RedisError, InferqError) as exc:  # a scrape must not fail the gateway
            log.warning("metrics: registry unreachable (%s)", exc)
        yield depth
        yield replicas
        yield job_samples
        yield stream_lag
        yield stream_entries
