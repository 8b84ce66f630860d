"""The committed bundle loads and verifies; any tampered or missing file is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.ranking.bundle import REQUIRED_FILES, RankerBundle

from .conftest import BUNDLE_DIR


def test_committed_bundle_is_complete_and_small(bundle: RankerBundle) -> None:
    assert bundle.version == "ml-small-svd-1"
    n = len(bundle.item_ids)
    assert n == len(bundle.catalog_rows) == 9742
    assert bundle.item_factors.shape == (n, bundle.dim) and 32 <= bundle.dim <= 64
    assert bundle.popularity.shape == (n, 2)
    assert np.all(np.diff(bundle.item_ids) > 0)
    total = sum(p.stat().st_size for p in BUNDLE_DIR.iterdir())
    print(f"bundle size: {total / 1e6:.2f} MB")
    assert total < 3.2e6
    test = bundle.manifest["evaluation"]["test"]
    for key in ("popularity", "svd_cf"):
        assert {"hr@10", "ndcg@10"} <= set(test[key])
    text = (BUNDLE_DIR / "ATTRIBUTION.md").read_text()
    assert "Harper" in text and "GroupLens" in text and "endorsement" in text


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "ranker"
    shutil.copytree(BUNDLE_DIR, dst)
    return dst


def test_tampered_file_is_refused_by_name(copy: Path) -> None:
    p = copy / "item_factors.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"item_factors\.npy sha256"):
        RankerBundle.load(copy)


def test_tampered_catalog_is_refused(copy: Path) -> None:
    p = copy / "catalog.csv"
    p.write_text(p.read_text().replace("Toy Story (1995)", "Toy Story (1996)"))
    with pytest.raises(ModelError, match=r"catalog\.csv"):
        RankerBundle.load(copy)


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file_is_refused_by_name(copy: Path, name: str) -> None:
    (copy / name).unlink()
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        RankerBundle.load(copy)


def test_missing_or_unlisted_manifest_entries(copy: Path) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"]["popularity.npy"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match=r"popularity\.npy is not listed"):
        RankerBundle.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ModelError, match=r"manifest\.json is missing"):
        RankerBundle.load(copy)
