"""Live terminal view of the demo (rich); plain progress lines when not on a terminal."""

from __future__ import annotations

import sys
import time

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table
from typing_extensions import Self


class LiveView:
    def __init__(self, duration_s: float) -> None:
        self.console = Console(stderr=False)
        self.tty = sys.stdout.isatty()
        self.duration_s = duration_s
        self.t0 = time.monotonic()
        self._live = Live(console=self.console, refresh_per_second=4) if self.tty else None
        self._last_line = 0.0

    def __enter__(self) -> Self:
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._live.__exit__(*exc)

    def update(self, status, rank, latencies: list[float]) -> None:
        lat = np.asarray(latencies[-200:]) if latencies else np.zeros(1)
        elapsed = time.monotonic() - self.t0
        face = (status.frames_with_face / status.frames * 100) if status.frames else 0.0
        mood = (rank.mood if rank is not None and rank.mood else "—")
        if self._live:
            t = Table(title=f"appliance demo — {elapsed:4.0f}/{self.duration_s:.0f} s", expand=True)
            t.add_column("#", width=2)
            t.add_column("title", ratio=2)
            t.add_column("score", width=7)
            t.add_column("why", ratio=3)
            if rank is not None:
                for i, it in enumerate(rank.items, 1):
                    t.add_row(str(i), it.title, f"{it.score:.3f}", "; ".join(r.text for r in it.reasons))
            t.caption = (f"camera {'ON' if status.camera_open else 'off'} · {status.camera_fps:.1f} fps in, "
                         f"{status.process_fps:.1f} fps analysed · faces {status.faces} · face on {face:.0f}% "
                         f"of frames · mood {mood} · Rank p50 {np.percentile(lat, 50):.2f} ms "
                         f"p99 {np.percentile(lat, 99):.2f} ms")
            self._live.update(t)
        elif elapsed - self._last_line >= 5.0:
            self._last_line = elapsed
            top = rank.items[0].title if rank is not None and rank.items else "—"
            print(f"[{elapsed:4.0f}s] camera {'ON' if status.camera_open else 'off'} "
                  f"{status.process_fps:.1f} fps, face on {face:.0f}% of frames, mood {mood}, "
                  f"Rank p50 {np.percentile(lat, 50):.2f} ms; top: {top}", flush=True)

    def final(self, summary: dict) -> None:
        self.console.print("[bold]demo summary[/bold]")
        for key in ("frames", "frames_with_face", "face_share", "affect_samples_received", "rank_calls",
                    "rank_ok", "rank_p50_ms", "rank_p99_ms", "reasons_share", "events_acked"):
            self.console.print(f"  {key:24s} {summary[key]}")
        for item in summary.get("last_top5", []):
            self.console.print(f"  • {item['title']} — {'; '.join(item['reasons'])}")
