"""On-box rollout of a release (image tag + model bundle version + canary share).

Bundles are verified (Ed25519 over the manifest and files) before anything changes, staged under
`releases/<version>`, switched in with one atomic symlink swap of `current`, health-checked, and
rolled back to the previous release when the check fails. The state file says what runs and why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.ops.bucketing import bucket
from appliance.ops.signing import verify_bundle

log = logging.getLogger("appliance.updater")


@dataclass(frozen=True)
class Release:
    image_tag: str
    bundle_version: str
    canary_share: float  # 0..1 of the fleet that takes this release


@dataclass(frozen=True)
class UpdateResult:
    outcome: str  # "skipped" (not in the canary), "switched", "rolled_back", "already_current"
    current: str | None
    detail: str = ""


class Updater:
    def __init__(self, root: str | Path, trusted_key_pem: bytes, box_id: str,
                 health_check: Callable[[Path], bool]) -> None:
        self.root = Path(root)
        self.releases = self.root / "releases"
        self.current_link = self.root / "current"
        self.state_path = self.root / "state.json"
        self.key = trusted_key_pem
        self.box_id = box_id
        self.health_check = health_check
        self.releases.mkdir(parents=True, exist_ok=True)

    def current(self) -> str | None:
        try:
            return os.readlink(self.current_link).split("/")[-1]
        except FileNotFoundError:
            return None

    def in_canary(self, release: Release) -> bool:
        if not 0.0 <= release.canary_share <= 1.0:
            raise ApplianceError(f"canary share must be within 0..1, got {release.canary_share}")
        return bucket(f"rollout:{release.bundle_version}", self.box_id) < release.canary_share

    def _switch(self, version: str) -> None:
        tmp = self.root / f".current-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(f"releases/{version}", tmp)
        os.replace(tmp, self.current_link)  # atomic: readers see the old or the new release, never none

    def _write_state(self, **state: object) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**state, "updated_unix_s": int(time.time())}, indent=2))
        tmp.replace(self.state_path)

    def apply(self, release: Release, bundle_src: str | Path) -> UpdateResult:
        """Verify, stage, switch, check; roll back on a failed check. Raises SignatureError on a bad bundle."""
        if not self.in_canary(release):
            return UpdateResult("skipped", self.current(), "this box is outside the canary share")
        if self.current() == release.bundle_version:
            return UpdateResult("already_current", release.bundle_version)
        src = Path(bundle_src)
        verify_bundle(src, self.key)  # before anything on the box changes
        target = self.releases / release.bundle_version
        if not target.exists():
            staging = self.releases / f".{release.bundle_version}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(src, staging)
            verify_bundle(staging, self.key)  # what landed on disk, not only what we were given
            staging.rename(target)
        previous = self.current()
        self._switch(release.bundle_version)
        ok = False
        try:
            ok = bool(self.health_check(self.current_link.resolve()))
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check
            log.warning("health check of %s raised %s", release.bundle_version, exc)
        if ok:
            self._write_state(**asdict(release), previous=previous, outcome="switched")
            log.info("switched to %s (image %s)", release.bundle_version, release.image_tag)
            return UpdateResult("switched", release.bundle_version)
        if previous is not None:
            self._switch(previous)
        else:
            self.current_link.unlink()
        self._write_state(**asdict(release), previous=previous, outcome="rolled_back")
        log.warning("release %s failed its health check; rolled back to %s", release.bundle_version, previous)
        return UpdateResult("rolled_back", previous, f"{release.bundle_version} failed its health check")


def ranker_bundle_healthy(path: Path) -> bool:
    """A ranking bundle is healthy when it loads, verifies and ranks a cold profile with reasons."""
    import numpy as np

    from appliance.fusion import ProfileState, SessionState
    from appliance.ranking import RankContext, Ranker, RankerBundle

    bundle = RankerBundle.load(path)
    catalog = bundle.catalog()
    ranker = Ranker(bundle, catalog)
    res = ranker.rank(ProfileState("health", catalog), SessionState("health", "health", catalog), None, False,
                      RankContext(device=1, local_hour=20, weekday=4, max_maturity=5), None, 10, 0)
    return len(res.items) == 10 and all(it.reasons for it in res.items) and bool(
        np.isfinite([it.score for it in res.items]).all())
