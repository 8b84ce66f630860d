"""What every benchmark records: machine, versions, percentiles; JSON + Markdown + plot writers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    from appliance.ops.host import describe

    return describe()


def percentiles(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "max_ms": round(float(a.max()), 4)}


def write_results(name: str, result: dict[str, Any], markdown: str, json_out: Path | None) -> Path:
    """Write `<json_out>` (or bench/results/<name>.json) plus a Markdown summary beside it."""
    out = Path(json_out) if json_out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False))
    out.with_suffix(".md").write_text(markdown)
    return out


def peak_rss_mb(pid: int | None = None) -> float:
    p = psutil.Process(pid or os.getpid())
    try:
        return round(p.memory_full_info().uss / 2**20, 1)
    except (psutil.AccessDenied, AttributeError):
        return round(p.memory_info().rss / 2**20, 1)


class RankerWorker:
    """`appliance worker ranker` (exactly what the supervisor starts) on a fresh data dir, for the serving
    benchmarks: `with RankerWorker("rank") as w:` starts it and waits until it answers; `w.sock`,
    `w.server` (psutil process), `w.ids` (catalog ids), `w.cfg`, `w.db_path`. `stop()` may be called
    inside the block (to read the database after a clean shutdown); the directory goes on exit, and
    `log_tail` keeps the end of the server's stderr. `catalog_titles`: start with a catalog of that many
    titles (see `pad_catalog`) instead of the bundle's own; `ranking`: overrides of the ranking config (e.g.
    the sequence encoder's runtime, for A/B runs)."""

    def __init__(self, name: str, serving: dict[str, Any] | None = None, stop_timeout_s: float = 15.0,
                 catalog_titles: int | None = None, ranking: dict[str, Any] | None = None) -> None:
        import tempfile

        from appliance.config import default_config

        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir="/tmp"))
        self.cfg = default_config().with_overrides(run_dir=str(self.tmp / "run"), data_dir=str(self.tmp / "data"),
                                                   metrics={"ranker_port": 0}, serving=serving or {},
                                                   ranking=ranking or {})
        self.sock = self.cfg.path(self.cfg.serving.unix_socket)
        self.db_path = self.cfg.path(self.cfg.store.db_path)
        self.stop_timeout_s = stop_timeout_s
        self.catalog_titles = catalog_titles
        self.log_tail = ""
        self._proc = None
        self._log = None

    def __enter__(self) -> RankerWorker:
        import sqlite3
        import subprocess
        import sys

        from appliance.client import ApplianceClient

        cfg_path = self.tmp / "config.json"
        cfg_path.write_text(self.cfg.model_dump_json())
        if self.catalog_titles:
            pad_catalog(self.cfg, self.catalog_titles)
        self._log = open(self.tmp / "ranker.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "worker", "ranker", "--config-json", str(cfg_path)],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "APPLIANCE_LOG_LEVEL": "WARNING"})
        try:
            c = ApplianceClient(f"unix:{self.sock}")
            c.wait_ready(60)
            c.close()
            self.server = psutil.Process(self._proc.pid)
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
            self.ids = np.array([r[0] for r in db.execute("SELECT item_id FROM catalog")], dtype=np.int64)
            db.close()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        import subprocess

        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
            self.log_tail = (self.tmp / "ranker.log").read_text(errors="replace")[-3000:]

    def __exit__(self, *exc: object) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def pad_catalog(cfg: Any, titles: int, seed: int = 0) -> int:
    """Put a catalog of `titles` titles in the store the ranker will open: the bundle's own, plus new
    titles the bundle never saw (a service's catalog grows faster than its model), each with the genres,
    year and maturity of a random existing title. Such titles are ranked from their content embedding, as
    on a real box. Returns how many were added."""
    from appliance.ranking.bundle import RankerBundle
    from appliance.store import Store

    rows = RankerBundle.load(cfg.path(cfg.ranking.bundle_dir)).catalog_rows
    extra = titles - len(rows)
    if extra < 0:
        raise ValueError(f"the bundle's catalog already has {len(rows)} titles (> {titles})")
    rng = np.random.default_rng(seed)
    top = max(r.item_id for r in rows)
    like = [rows[i] for i in rng.integers(0, len(rows), extra)]
    store = Store(cfg.path(cfg.store.db_path))
    try:
        store.import_catalog([(r.item_id, r.title, "|".join(r.genres), r.year, r.maturity) for r in rows]
                             + [(top + 1 + i, f"Bench title {i + 1}", "|".join(r.genres), r.year, r.maturity)
                                for i, r in enumerate(like)])
        assert store.catalog_count() == titles
    finally:
        store.close()
    return extra


def scrape_metrics(server: Any) -> dict[str, float]:
    """The ranker's Prometheus samples (`name{labels}` -> value) from its endpoint on loopback, found among
    the process's listening TCP ports; {} when none answers."""
    import urllib.request

    import psutil

    for c in server.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN:
            continue
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{c.laddr.port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
        if out:
            return out
    return {}
