"""The ranker process: store + in-memory state + gRPC servers + the vision link, until SIGTERM."""

from __future__ import annotations

import logging

from appliance.config import ApplianceConfig
from appliance.ops.stop_signal import StopSignal
from appliance.serving.core import ApplianceCore
from appliance.serving.metrics import RankerMetrics
from appliance.serving.retention import RetentionSweeper
from appliance.serving.server import StoreHealthWatch, build_servers
from appliance.serving.tuning import freeze_heap, tune_for_latency
from appliance.serving.vision_link import VisionLink
from appliance.store import Store

log = logging.getLogger("appliance.ranker")


class RankerProcess:
    """Everything the ranker process runs; usable in-process by tests and benchmarks too."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.path(cfg.store.db_path))
        try:
            self.core = ApplianceCore(cfg, self.store)
        except BaseException:
            self.store.close()
            raise
        try:
            self.link = VisionLink(cfg, self.core)
        except BaseException:
            self.core.close()
            self.store.close()
            raise
        self.metrics = RankerMetrics(self.core)
        try:
            self.servers = build_servers(cfg, self.core, on_consent_change=self.link.consent_changed,
                                         metrics=self.metrics)
        except BaseException:  # e.g. a config error: leave nothing running behind
            self.link.stop()
            self.core.close()
            self.store.close()
            raise
        self.health_watch = StoreHealthWatch(self.core, self.servers, cfg.serving.health_period_s)
        self.retention = RetentionSweeper(self.core, cfg.store.retention_sweep_s)
        self.metrics_port: int | None = None
        if cfg.metrics.enabled:
            try:
                self.metrics_port = self.metrics.serve(cfg.metrics.host, cfg.metrics.ranker_port)
            except OSError as exc:  # a busy port must not take ranking down
                log.error("metrics endpoint %s:%d not started: %s", cfg.metrics.host, cfg.metrics.ranker_port,
                          exc.strerror or exc)
        self.link.start()
        self.health_watch.start()
        self.retention.start()
        log.info("ranker serving on unix:%s%s (catalog %d titles, bundle %s)", self.servers.unix_socket,
                 f" and tcp:{self.servers.tcp_port}" if self.servers.tcp_port else "",
                 len(self.core.catalog.ids), self.core.bundle.version)

    def stop(self) -> None:
        self.health_watch.stop_event.set()
        self.retention.stop_event.set()
        self.metrics.stop()
        self.servers.stop(grace=1.0)
        self.link.stop()
        self.core.close()
        self.store.close()


def run_ranker(cfg: ApplianceConfig) -> int:
    """Process entry point: serve until SIGTERM/SIGINT, then shut down cleanly."""
    done = StopSignal()
    tune_for_latency(cfg.serving.blas_threads)
    proc = RankerProcess(cfg)
    freeze_heap()
    done.wait()
    log.info("ranker stopping")
    proc.stop()
    return 0
