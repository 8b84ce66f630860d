"""The committed bundle loads and verifies; any tampered or missing file is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.ranking.bundle import REQUIRED_FILES, SEQUENCE_FILES, TRANSITION_FILE, RankerBundle

from .conftest import BUNDLE_DIR


def test_committed_bundle_is_complete_and_small(bundle: RankerBundle) -> None:
    assert bundle.version == "ml-small-sasrec-1.1"
    n = len(bundle.item_ids)
    assert n == len(bundle.catalog_rows) == 9742
    assert bundle.item_factors.shape == (n, bundle.dim) and 32 <= bundle.dim <= 64
    assert bundle.popularity.shape == (n, 2)
    assert np.all(np.diff(bundle.item_ids) > 0)
    total = sum(p.stat().st_size for p in BUNDLE_DIR.iterdir())
    print(f"bundle size: {total / 1e6:.2f} MB")
    assert total < 10e6
    ev = bundle.manifest["evaluation"]
    for key in ("popularity", "itemknn", "als", "ease", "transition"):
        assert {"HR@10", "NDCG@10", "HR@20", "NDCG@20"} <= set(ev["baselines"][key])
    assert {"HR@10", "NDCG@10", "HR@20", "NDCG@20"} <= set(ev["ours"])
    assert bundle.sequence is not None and bundle.sequence.table.shape[0] == n
    assert bundle.manifest["sequence"]["params"]["max_len"] == bundle.sequence.max_len
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


@pytest.mark.parametrize("name", REQUIRED_FILES + SEQUENCE_FILES + (TRANSITION_FILE,))
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


def test_tampered_sequence_model_is_refused(copy: Path) -> None:
    p = copy / "sequence.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"sequence\.onnx sha256"):
        RankerBundle.load(copy)


def test_a_format_1_bundle_without_a_sequence_model_still_loads(copy: Path) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    m["format"] = 1
    for name in (*SEQUENCE_FILES, TRANSITION_FILE):
        del m["files"][name]
        (copy / name).unlink()
    (copy / "manifest.json").write_text(json.dumps(m))
    b = RankerBundle.load(copy)
    assert b.sequence is None and b.transition is None
