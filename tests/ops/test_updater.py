"""Rollout: signed bundles only, atomic switch, health check, rollback; canary buckets are stable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.ops.bucketing import box_id, bucket
from appliance.ops.signing import SignatureError, generate_key, sign_bundle, verify_bundle
from appliance.ops.updater import Release, Updater, ranker_bundle_healthy
from appliance.ranking.bundle import sha256_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "ranker"


def copy_bundle(tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("manifest.sig"))
    return dst


def relist(bundle: Path, filename: str) -> None:
    """Update the manifest's checksum of one file (a well-formed but different bundle)."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][filename]["sha256"] = sha256_file(bundle / filename)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def keys():
    return generate_key()


def test_signed_bundle_verifies_and_tampering_is_refused(tmp_path, keys):
    private, public = keys
    b = copy_bundle(tmp_path, "b1")
    sign_bundle(b, private)
    verify_bundle(b, public)
    _, other_public = generate_key()
    with pytest.raises(SignatureError):
        verify_bundle(b, other_public)  # signed by someone else
    pop = np.load(b / "popularity.npy")
    pop[0, 0] += 1.0
    np.save(b / "popularity.npy", pop)
    with pytest.raises(SignatureError):
        verify_bundle(b, public)  # a file changed after signing
    relist(b, "popularity.npy")
    with pytest.raises(SignatureError):
        verify_bundle(b, public)  # ... even with the manifest updated to match
    (b / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(b, public)


def test_switch_then_rollback_of_a_bad_bundle(tmp_path, keys):
    private, public = keys
    good = copy_bundle(tmp_path, "good")
    sign_bundle(good, private)
    up = Updater(tmp_path / "box", public, box_id(tmp_path / "box"), ranker_bundle_healthy)
    r1 = up.apply(Release("appliance:1.0", "v1", 1.0), good)
    assert r1.outcome == "switched" and up.current() == "v1"

    bad = copy_bundle(tmp_path, "bad")  # signed, well-formed manifest, but factors full of NaN
    f = np.load(bad / "item_factors.npy")
    np.save(bad / "item_factors.npy", np.full_like(f, np.nan))
    relist(bad, "item_factors.npy")
    sign_bundle(bad, private)
    r2 = up.apply(Release("appliance:1.1", "v2", 1.0), bad)
    assert r2.outcome == "rolled_back" and up.current() == "v1"
    state = json.loads((tmp_path / "box" / "state.json").read_text())
    assert state["outcome"] == "rolled_back" and state["previous"] == "v1"


def test_tampered_release_changes_nothing(tmp_path, keys):
    private, public = keys
    good = copy_bundle(tmp_path, "good")
    sign_bundle(good, private)
    up = Updater(tmp_path / "box", public, "box-1", ranker_bundle_healthy)
    up.apply(Release("img:1", "v1", 1.0), good)
    evil = copy_bundle(tmp_path, "evil")
    sign_bundle(evil, private)
    (evil / "catalog.csv").write_text("movieId,title,genres\n1,Injected,Drama\n")
    with pytest.raises(SignatureError):
        up.apply(Release("img:2", "v2", 1.0), evil)
    assert up.current() == "v1" and not (tmp_path / "box" / "releases" / "v2").exists()


def test_canary_share_is_deterministic_and_proportional(tmp_path, keys):
    _, public = keys
    ids = [f"box-{i}" for i in range(4000)]
    share = 0.1
    taken = [Updater(tmp_path / "u", public, i, lambda p: True).in_canary(Release("t", "v9", share)) for i in ids]
    assert abs(sum(taken) / len(ids) - share) < 0.02
    assert bucket("rollout:v9", "box-7") == bucket("rollout:v9", "box-7")
    assert bucket("rollout:v9", "box-7") != bucket("rollout:v10", "box-7")
    assert box_id(tmp_path / "d") == box_id(tmp_path / "d")  # kept, not regenerated
