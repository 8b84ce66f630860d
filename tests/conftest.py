"""Shared fixtures. Tests use real components on loopback and make their own small data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be long.
    short = Path(f"/tmp/ap-{os.getpid()}-{tmp_path.name[-12:]}")
    short.mkdir(parents=True, exist_ok=True)
    yield short
    for p in sorted(short.rglob("*"), reverse=True):
        try:
            p.unlink() if not p.is_dir() else p.rmdir()
        except OSError:
            pass
    try:
        short.rmdir()
    except OSError:
        pass


def shared_path(*parts: str) -> Path:
    """A file under ../shared (reference data for development); skip when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data not present: {p}")
    return p
