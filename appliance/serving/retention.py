"""Retention: viewing events are kept `store.event_retention_days` (what the privacy page promises), then
deleted from the database and from the profile's in-memory state, at start and every `retention_sweep_s`."""

from __future__ import annotations

import logging
import threading

from appliance.errors import StoreError
from appliance.serving.core import ApplianceCore

log = logging.getLogger("appliance.ranker")


class RetentionSweeper(threading.Thread):
    def __init__(self, core: ApplianceCore, period_s: float) -> None:
        super().__init__(name="retention", daemon=True)
        self.core, self.period_s = core, period_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            try:
                self.core.enforce_retention()
            except StoreError as exc:  # disk full or I/O error: nothing was deleted; try again next period
                log.error("retention sweep failed: %s", exc)
            except Exception:  # noqa: BLE001 - the sweeper must outlive any surprise
                log.exception("retention sweep failed")
