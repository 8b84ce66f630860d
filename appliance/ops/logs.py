"""Structured JSON logs: stderr (journald, `docker logs`) and a size-rotated file per process.

Messages carry counts and states, never personal data (profile, session or title ids, events, frames):
errors are logged by type and place (`serving.errors.log_bug`), not by message.

Rotation is Python's `RotatingFileHandler`, by size, inside the process, rather than a `WatchedFileHandler`
plus a logrotate snippet: the same code rotates in a container (no logrotate, no cron there) and in a
systemd install, the limit comes from the firmware config like every other limit, and each process owns
its own file (supervisor.log, ranker.log, vision.log), so no two processes ever rotate the same file.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import ApplianceConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "proc": record.processName,
               "pid": record.process, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_file(cfg: ApplianceConfig, process_name: str) -> Path | None:
    """Where this process's log file goes under the config (None: files are off)."""
    if not cfg.logging.dir:
        return None
    return Path(cfg.path(cfg.logging.dir)) / f"{process_name}.log"


def setup_logging(process_name: str, level: str | None = None, cfg: ApplianceConfig | None = None) -> None:
    """Configure the root logger once per process: JSON lines on stderr and, with a config whose
    `logging.dir` is set, in `<dir>/<process_name>.log`, rotated at `logging.max_bytes`."""
    import multiprocessing

    multiprocessing.current_process().name = process_name
    fmt = JsonFormatter()
    handlers: list[logging.Handler] = []
    if cfg is None or cfg.logging.stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    path = log_file(cfg, process_name) if cfg is not None else None
    if path is not None:
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            handlers.append(logging.handlers.RotatingFileHandler(
                path, maxBytes=cfg.logging.max_bytes, backupCount=cfg.logging.backup_count, encoding="utf-8"))
        except OSError as exc:  # an unwritable log dir must not stop the appliance: stderr still works
            print(json.dumps({"level": "warning", "proc": process_name,
                              "msg": f"log file {path} not opened: {exc.strerror}"}), file=sys.stderr)
    for h in handlers:
        h.setFormatter(fmt)
        h._appliance = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in root.handlers:
        if getattr(old, "_appliance", False):  # ours from an earlier call: release its file
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level or os.environ.get("APPLIANCE_LOG_LEVEL") or (cfg.logging.level if cfg else "INFO"))
