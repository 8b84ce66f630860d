"""Deterministic bucketing of a box or profile: the same salted id always lands in the same place.

Used for canary rollouts and A/B arms. The salt is per rollout/experiment, so buckets are independent
across them; the hash is one-way, so a bucket says nothing about the id."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path


def bucket(salt: str, unit_id: str) -> float:
    """A number in [0, 1) fixed by (salt, unit_id), uniform over ids."""
    digest = hashlib.sha256(f"{salt}\0{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def box_id(data_dir: str | Path) -> str:
    """This box's random id, created once and kept in the data directory (never derived from hardware)."""
    path = Path(data_dir) / "box_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = secrets.token_hex(16)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new + "\n")
        tmp.replace(path)
        return new
