"""Prometheus metrics of the ranker process, on loopback (`metrics.host:metrics.ranker_port`).

Request latency is measured in the handler wrapper (server side, decode to encode) and observed into a
histogram per method; everything else is read from the live state when Prometheus scrapes, so the
request path pays one histogram observation and nothing more. No label carries a profile, a session or a
title: labels are method names and status codes only.

    appliance_rpc_seconds{method}              histogram of handler time
    appliance_rpc_total{method,code}           calls by status code
    appliance_events_ingested_total            durable events (rate() = events/s)
    appliance_ingest_commits_total             group commits (fsyncs)
    appliance_ingest_queue_events              events waiting for their commit (queue depth)
    appliance_ingest_queue_limit_events        the bound beyond which ingest is refused
    appliance_ingest_rejected_total{reason}    RESOURCE_EXHAUSTED answers (queue_full, rate_limit)
    appliance_rank_cache_{hits,misses}_total
    appliance_affect_age_seconds               age of the newest affect sample (-1: none)
    appliance_vision_up                        1 while the vision process is heard from
    appliance_vision_camera_open, appliance_vision_camera_fps, appliance_vision_process_fps,
    appliance_vision_detector_seconds, appliance_vision_frames_total, appliance_vision_reconnects_total
    appliance_store_up                         1 while the store reads; appliance_store_writable likewise
    appliance_store_bytes                      database + WAL size
    appliance_sessions_open, appliance_profiles
    process_* (RSS, CPU, open fds) from prometheus_client's process collector
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from appliance.serving.core import ApplianceCore

log = logging.getLogger("appliance.ranker.metrics")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)


class RankerMetrics:
    """The ranker's metrics registry, and (when enabled) its HTTP endpoint."""

    def __init__(self, core: ApplianceCore, vision_timeout_s: float = 1.5) -> None:
        self.core = core
        self.registry = CollectorRegistry()
        self.latency = Histogram("appliance_rpc_seconds", "gRPC handler time by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.calls = Counter("appliance_rpc", "gRPC calls by method and status code", ["method", "code"],
                             registry=self.registry)
        self._hist: dict[str, object] = {}
        self._calls: dict[tuple[str, str], object] = {}
        ProcessCollector(registry=self.registry)
        self.registry.register(_StateCollector(core, int(vision_timeout_s * 1e9)))
        self.http = None
        self.port: int | None = None

    def observe(self, method: str, seconds: float, code: str) -> None:
        h = self._hist.get(method)
        if h is None:
            h = self._hist[method] = self.latency.labels(method)
        h.observe(seconds)  # type: ignore[attr-defined]
        c = self._calls.get((method, code))
        if c is None:
            c = self._calls[(method, code)] = self.calls.labels(method, code)
        c.inc()  # type: ignore[attr-defined]

    def serve(self, host: str, port: int) -> int:
        """Start the endpoint; returns the port (0 in config = a free one)."""
        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self.http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None


class _StateCollector:
    """Gauges read from the live state at scrape time."""

    def __init__(self, core: ApplianceCore, vision_timeout_ns: int) -> None:
        self.core, self.vision_timeout_ns = core, vision_timeout_ns

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        core = self.core
        now = time.monotonic_ns()
        w = core.writer

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("appliance_events_ingested", "durable events applied to the state", core.counters.events_ingested)
        yield counter("appliance_ingest_commits", "group commits (one fsync each)", w.commits)
        yield gauge("appliance_ingest_queue_events", "events waiting for their group commit", w.queued_events)
        yield gauge("appliance_ingest_queue_limit_events", "queue bound (RESOURCE_EXHAUSTED beyond)", w.max_queue_events)
        yield gauge("appliance_ingest_last_commit_seconds", "time of the last group commit", w.last_commit_s)
        rejected = CounterMetricFamily("appliance_ingest_rejected", "ingest calls refused with RESOURCE_EXHAUSTED",
                                       labels=["reason"])
        rejected.add_metric(["queue_full"], w.rejected)
        rejected.add_metric(["rate_limit"], core.limiter.rejected)
        yield rejected
        yield counter("appliance_ranks", "Rank answers computed or served from cache", core.counters.ranks)
        yield counter("appliance_rank_cache_hits", "Rank answers served from the cache", core.rank_cache.hits)
        yield counter("appliance_rank_cache_misses", "Rank answers computed", core.rank_cache.misses)
        derived = CounterMetricFamily("appliance_rank_state_derivations", "a session's ranking state derived: "
                                      "prepared (before an event's ack, at session start) or by a Rank", labels=["where"])
        derived.add_metric(["prepared"], core.ranker.derivations.prepared)
        derived.add_metric(["rank"], core.ranker.derivations.on_rank)
        yield derived
        affect = core.latest_affect()
        yield gauge("appliance_affect_age_seconds", "age of the newest affect sample (-1: none)",
                    affect.age_s(now) if affect is not None else -1.0)
        v = core.vision
        alive = v.heard_ns > 0 and now - v.heard_ns < self.vision_timeout_ns
        yield gauge("appliance_vision_up", "1 while the vision process is heard from", float(alive))
        yield gauge("appliance_vision_camera_open", "1 while the capture device is open", float(alive and v.camera_open))
        yield gauge("appliance_vision_camera_fps", "frames arriving from the camera per second", v.camera_fps if alive else 0.0)
        yield gauge("appliance_vision_process_fps", "frames analysed per second", v.process_fps if alive else 0.0)
        yield gauge("appliance_vision_detector_seconds", "face detector inference time", v.detector_ms / 1e3)
        yield counter("appliance_vision_frames", "frames analysed (as reported by vision)", v.frames)
        yield counter("appliance_vision_reconnects", "camera reconnects (as reported by vision)", v.reconnects)
        yield counter("appliance_affect_samples", "affect samples accepted", v.affect_samples_received)
        store = core.store
        yield gauge("appliance_store_up", "1 while the store answers reads", float(store.healthy_read))
        yield gauge("appliance_store_writable", "1 while the store takes writes", float(store.writable))
        size = 0
        for suffix in ("", "-wal"):
            try:
                size += os.path.getsize(f"{store.path}{suffix}")
            except OSError:
                pass
        yield gauge("appliance_store_bytes", "database and WAL size", size)
        yield gauge("appliance_sessions_open", "open sessions", len(core._sessions))
        yield gauge("appliance_profiles", "profiles in memory", len(core._profiles))
