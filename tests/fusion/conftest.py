"""Fixtures: the committed bundle's catalog (real titles and genres) for the fusion state."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.ranking.bundle import RankerBundle
from appliance.ranking.catalog import Catalog

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "models" / "ranker"


@pytest.fixture(scope="session")
def bundle() -> RankerBundle:
    return RankerBundle.load(BUNDLE_DIR)


@pytest.fixture(scope="session")
def catalog(bundle: RankerBundle) -> Catalog:
    return bundle.catalog()
