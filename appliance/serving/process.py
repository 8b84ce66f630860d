"""The ranker process: store + in-memory state + gRPC servers + the vision link, until SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

from appliance.config import ApplianceConfig
from appliance.serving.core import ApplianceCore
from appliance.serving.server import StoreHealthWatch, build_servers
from appliance.serving.vision_link import VisionLink
from appliance.store import Store

log = logging.getLogger("appliance.ranker")


class RankerProcess:
    """Everything the ranker process runs; usable in-process by tests and benchmarks too."""

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.path(cfg.store.db_path))
        self.core = ApplianceCore(cfg, self.store)
        self.link = VisionLink(cfg, self.core)
        self.servers = build_servers(cfg, self.core, on_consent_change=self.link.consent_changed)
        self.health_watch = StoreHealthWatch(self.core, self.servers)
        self.link.start()
        self.health_watch.start()
        log.info("ranker serving on unix:%s%s (catalog %d titles, bundle %s)", self.servers.unix_socket,
                 f" and tcp:{self.servers.tcp_port}" if self.servers.tcp_port else "",
                 len(self.core.catalog.ids), self.core.bundle.version)

    def stop(self) -> None:
        self.health_watch.stop_event.set()
        self.servers.stop(grace=1.0)
        self.link.stop()
        self.store.close()


def run_ranker(cfg: ApplianceConfig) -> int:
    """Process entry point: serve until SIGTERM/SIGINT, then shut down cleanly."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    proc = RankerProcess(cfg)
    done.wait()
    log.info("ranker stopping")
    proc.stop()
    return 0
