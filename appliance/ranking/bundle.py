"""The versioned ranking-model bundle: loaded only when every file matches the manifest's sha256.

Layout (written by `appliance.ranking.train`):

    manifest.json        version, created_at, params, source sha256s, metrics, files{name: sha256, bytes}
    catalog.csv          movieId,title,genres,maturity  (the catalog the box ships)
    item_ids.npy         int64 [n], sorted, = catalog ids
    item_factors.npy     float16 [n, d]  collaborative item embedding (cold titles placed by content)
    popularity.npy       float32 [n, 2]  log1p(interactions), log1p(recency-weighted interactions)
    content_weights.npy  float32 [F, d]  ridge map content features -> embedding (titles the bundle lacks)
    ATTRIBUTION.md       data licence terms
    sequence.onnx        (format 2, optional) SASRec encoder: recent titles -> query vector (ONNX Runtime)
    sequence_items.npy   (format 2, optional) float32 [n, d] its item table; zero row = unseen in training
    transition.npz       (format 2, optional) "watched next" chain P(j | i) as CSR arrays indptr/indices/data
                         over bundle rows (first-order, from consecutive titles of the training histories)

Format 1 bundles (no sequence model) still load; the ranker's sequence signal is then 0.

Content features come from the catalog alone (genres, year), so a title added to the box's catalog
after training still gets an embedding: `content_factors(catalog) @ content_weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ModelError, ValidationError
from appliance.ranking.catalog import GENRES, Catalog, CatalogRow, parse_catalog_csv

MANIFEST = "manifest.json"
REQUIRED_FILES = ("catalog.csv", "item_ids.npy", "item_factors.npy", "popularity.npy",
                  "content_weights.npy", "ATTRIBUTION.md")
FORMAT = 2                      # 2 adds the optional sequence model; format 1 bundles still load
SEQUENCE_FILES = ("sequence.onnx", "sequence_items.npy")
TRANSITION_FILE = "transition.npz"

DECADES = tuple(range(1920, 2030, 10))  # bucket 0 = before 1920; then one per decade up to the 2010s+
CONTENT_FEATURES = "genres19+no_genre+decade12+year_unknown+year_z+bias"


def content_features(genres: np.ndarray, years: np.ndarray) -> np.ndarray:
    """Content features per title from its MovieLens genres (first 19 columns) and release year."""
    n = genres.shape[0]
    g = genres[:, : len(GENRES)].astype(np.float32)
    no_genre = (g.sum(axis=1, keepdims=True) == 0).astype(np.float32)
    y = years.astype(np.int64)
    known = y > 0
    bucket = np.searchsorted(np.asarray(DECADES), y, side="right")  # 0..len(DECADES)
    dec = np.zeros((n, len(DECADES) + 1), dtype=np.float32)
    dec[np.arange(n)[known], bucket[known]] = 1.0
    y_z = np.where(known, (y - 1995) / 20.0, 0.0).astype(np.float32)[:, None]
    return np.hstack([g, no_genre, dec, (~known).astype(np.float32)[:, None], y_z,
                      np.ones((n, 1), dtype=np.float32)])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RankerBundle:
    """A verified bundle in memory. Arrays are float32 and aligned with `item_ids`."""

    path: Path
    manifest: dict[str, Any]
    version: str
    item_ids: np.ndarray
    item_factors: np.ndarray
    popularity: np.ndarray
    content_weights: np.ndarray
    catalog_rows: list[CatalogRow]
    params: dict[str, Any] = field(default_factory=dict)
    sequence: Any = None             # appliance.ranking.sequence.SequenceModel, or None (format 1)
    sequence_meta: dict[str, Any] = field(default_factory=dict)
    transition: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # CSR indptr, indices, data

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    def catalog(self) -> Catalog:
        return Catalog.from_rows(self.catalog_rows)

    def content_embedding(self, catalog: Catalog) -> np.ndarray:
        """Embedding of every catalog title predicted from its content alone."""
        return content_features(catalog.genres, catalog.year) @ self.content_weights

    @classmethod
    def load(cls, directory: str | os.PathLike[str], sequence_runtime: str = "onnxruntime") -> RankerBundle:
        """Verify and load a bundle; the sequence encoder runs on `sequence_runtime` ("onnxruntime", the
        reference, which the offline tools (evaluation, federation) use, or "numpy", which the box's ranker
        uses by default (its config's `ranking.sequence_runtime`): see appliance.ranking.sequence)."""
        d = Path(directory)
        mpath = d / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"ranker bundle {d}: {MANIFEST} is missing") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"ranker bundle {d}: {MANIFEST} unreadable: {exc}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise ModelError(f"ranker bundle {d}: {MANIFEST} has no 'files' table")
        if manifest.get("format") not in (1, FORMAT):
            raise ModelError(f"ranker bundle {d}: format {manifest.get('format')!r} is not 1 or {FORMAT}")
        seq_meta = manifest.get("sequence") if manifest.get("format") == FORMAT else None
        if seq_meta is not None and not isinstance(seq_meta, dict):
            raise ModelError(f"ranker bundle {d}: 'sequence' must be a table")
        trans_meta = manifest.get("transition") if manifest.get("format") == FORMAT else None
        for name in REQUIRED_FILES + (SEQUENCE_FILES if seq_meta else ()) + ((TRANSITION_FILE,) if trans_meta else ()):
            if name not in files:
                raise ModelError(f"ranker bundle {d}: {name} is not listed in {MANIFEST}")
        for name, meta in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ModelError(f"ranker bundle {d}: bad file name {name!r} in {MANIFEST}")
            p = d / name
            if not p.is_file():
                raise ModelError(f"ranker bundle {d}: {name} is missing")
            want = meta.get("sha256") if isinstance(meta, dict) else None
            got = sha256_file(p)
            if got != want:
                raise ModelError(f"ranker bundle {d}: {name} sha256 {got[:12]}... does not match the "
                                 f"manifest ({str(want)[:12]}...): corrupt or tampered")
        try:
            ids = np.load(d / "item_ids.npy", allow_pickle=False).astype(np.int64)
            factors = np.load(d / "item_factors.npy", allow_pickle=False).astype(np.float32)
            pop = np.load(d / "popularity.npy", allow_pickle=False).astype(np.float32)
            cw = np.load(d / "content_weights.npy", allow_pickle=False).astype(np.float32)
            rows = parse_catalog_csv(d / "catalog.csv")
        except ValidationError as exc:
            raise ModelError(f"ranker bundle {d}: catalog.csv: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"ranker bundle {d}: cannot load arrays: {exc}") from None
        n = len(ids)
        if factors.ndim != 2 or factors.shape[0] != n:
            raise ModelError(f"ranker bundle {d}: item_factors.npy shape {factors.shape} != ({n}, d)")
        if pop.shape != (n, 2):
            raise ModelError(f"ranker bundle {d}: popularity.npy shape {pop.shape} != ({n}, 2)")
        if cw.ndim != 2 or cw.shape[1] != factors.shape[1]:
            raise ModelError(f"ranker bundle {d}: content_weights.npy shape {cw.shape} does not fit d")
        if n and np.any(np.diff(ids) <= 0):
            raise ModelError(f"ranker bundle {d}: item_ids.npy is not strictly increasing")
        if not (np.isfinite(factors).all() and np.isfinite(pop).all() and np.isfinite(cw).all()):
            raise ModelError(f"ranker bundle {d}: arrays hold NaN or inf")
        version = str(manifest.get("version") or "")
        if not version:
            raise ModelError(f"ranker bundle {d}: {MANIFEST} has no version")
        sequence = None
        if seq_meta:
            from appliance.ranking.sequence import SequenceModel

            try:
                table = np.load(d / "sequence_items.npy", allow_pickle=False).astype(np.float32)
                max_len = int(seq_meta["params"]["max_len"])
                heads = int(seq_meta["params"].get("heads", 1))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"ranker bundle {d}: sequence model unreadable: {exc}") from None
            if table.ndim != 2 or table.shape[0] != n or not np.isfinite(table).all():
                raise ModelError(f"ranker bundle {d}: sequence_items.npy shape {table.shape} != ({n}, d) "
                                 "or holds NaN/inf")
            sequence = SequenceModel(d / "sequence.onnx", table, max_len, heads, sequence_runtime)
        transition = None
        if trans_meta:
            try:
                with np.load(d / TRANSITION_FILE, allow_pickle=False) as z:
                    indptr = z["indptr"].astype(np.int64)
                    indices = z["indices"].astype(np.int64)
                    data = z["data"].astype(np.float32)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"ranker bundle {d}: {TRANSITION_FILE} unreadable: {exc}") from None
            if (indptr.shape != (n + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
                    or indptr[-1] != len(indices) or len(data) != len(indices)
                    or (len(indices) and (indices.min() < 0 or indices.max() >= n))
                    or not np.isfinite(data).all()):
                raise ModelError(f"ranker bundle {d}: {TRANSITION_FILE} is not a valid ({n} x {n}) CSR matrix")
            transition = (indptr, indices, data)
        return cls(path=d, manifest=manifest, version=version, item_ids=ids, item_factors=factors,
                   popularity=pop, content_weights=cw, catalog_rows=rows,
                   params=dict(manifest.get("ranker") or {}), sequence=sequence,
                   sequence_meta=dict(seq_meta or {}), transition=transition)
