"""Fixtures: the committed ranker bundle (real model, real catalog) and a Ranker over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.fusion.state import ProfileState, SessionState
from appliance.ranking.bundle import RankerBundle
from appliance.ranking.catalog import Catalog
from appliance.ranking.ranker import RankContext, Ranker

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "models" / "ranker"


@pytest.fixture(scope="session")
def bundle() -> RankerBundle:
    return RankerBundle.load(BUNDLE_DIR)


@pytest.fixture(scope="session")
def catalog(bundle: RankerBundle) -> Catalog:
    return bundle.catalog()


@pytest.fixture(scope="session")
def ranker(bundle: RankerBundle, catalog: Catalog) -> Ranker:
    return Ranker(bundle, catalog, affect_weight=0.15, diversity=0.2, affect_stale_s=1.0)


@pytest.fixture
def profile(catalog: Catalog) -> ProfileState:
    return ProfileState("household-1", catalog)


@pytest.fixture
def session(catalog: Catalog) -> SessionState:
    return SessionState("household-1", "s-1", catalog)


@pytest.fixture
def tv_evening() -> RankContext:
    return RankContext(device=1, local_hour=20, weekday=1, max_maturity=5)
