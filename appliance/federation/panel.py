"""The shared start the fleet fine-tunes: a bundle trained only on what the service may hold centrally.

Issue 8: the cloud never sees a household's raw events, so the start model cannot be the shipped bundle
(trained on every MovieLens user). What the service may hold is (a) an opted-in panel, simulated as a
disjoint random 20% of the users of the interactions file (the choice is seeded and public), and
(b) content metadata (the catalog). `panel_bundle` trains the SASRec sequence model and the rest of the
bundle (`train_seq.build_bundle`) on the panel's histories only, over the catalog of the reference
bundle, and caches the result under build/ keyed by everything that decides it. The other 80% of the
users are the fleet's evaluation population (issue 6 protocol: leave-last-out; their last title is the
test item, everything before it is on the box).

Epochs are chosen on the panel's own validation item (each panel user's last title: held out of the
panel fit, evaluated every 5 epochs, the best snapshot kept); the panel is small, so this is a few
minutes of CPU on one thread.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

PANEL_CACHE = Path("build/federation/panel")


@dataclass(frozen=True)
class PanelSplit:
    panel: np.ndarray   # user indices (of the leave-last-out split) in the central panel
    fleet: np.ndarray   # the others: evaluated, never seen centrally


def split_panel(n_users: int, share: float = 0.2, seed: int = 0) -> PanelSplit:
    if not 0 < share < 1:
        raise ValueError("panel share must be within (0, 1)")
    rng = np.random.default_rng([int(seed), 0x9A7E1])
    perm = rng.permutation(n_users)
    k = max(1, int(round(share * n_users)))
    return PanelSplit(np.sort(perm[:k]), np.sort(perm[k:]))


def default_seq_params():
    from appliance.ranking.train_seq import SeqParams

    # the shipped setting, with a validation-chosen epoch count (at most 60) on the panel's last items;
    # every field spelt out, so a change of train_seq's defaults does not silently change the start
    return SeqParams(d=64, max_len=50, blocks=2, heads=1, dropout=0.3, lr=4e-3, lr_decay=1.0, weight_decay=0.0,
                     batch=64, epochs=60, eval_every=5, patience=2, windows="all", negatives=0, seed=0, threads=1)


def panel_bundle(interactions: Path, reference_bundle: Path, *, share: float = 0.2, seed: int = 0,
                 params=None, cache: Path = PANEL_CACHE, log: Callable[[str], None] = print) -> tuple[Path, PanelSplit]:
    """(bundle directory trained on the panel only, the panel/fleet split); cached under `cache`."""
    from appliance.evaluation.recsys.data import leave_last_out, read_interactions
    from appliance.ranking import train_seq
    from appliance.ranking.bundle import RankerBundle
    from appliance.ranking.catalog import Catalog

    p = params or default_seq_params()
    split = leave_last_out(read_interactions(interactions))
    ps = split_panel(split.n_users, share, seed)
    ref = RankerBundle.load(reference_bundle)
    catalog = Catalog.from_rows(ref.catalog_rows)
    rows, known = catalog.index_of(split.item_ids)
    hist = [rows[split.seqs[u]][known[split.seqs[u]]] for u in ps.panel]
    ts = [split.ts[u][known[split.seqs[u]]] for u in ps.panel]
    h = hashlib.sha256()
    for a in hist:
        h.update(a.astype(np.int64).tobytes() + b"|")
    h.update(ref.item_ids.astype(np.int64).tobytes())
    h.update(json.dumps(asdict(p), sort_keys=True).encode())
    out = cache / h.hexdigest()[:20]
    if (out / "manifest.json").is_file():
        try:
            RankerBundle.load(out)
            log(f"panel start: cached {out}")
            return out, ps
        except Exception as exc:  # a half-written cache entry: rebuild it
            log(f"panel start: cache {out} unusable ({exc}); rebuilding")
    t0 = time.monotonic()
    log(f"panel start: training on {len(hist)} panel users ({sum(map(len, hist))} interactions), "
        f"{len(catalog)} titles; epochs chosen on the panel's last titles")
    fit = [a[:-1] for a in hist if len(a) >= 3]
    vt = np.array([a[-1] for a in hist if len(a) >= 3], dtype=np.int64)
    model, curve = train_seq.train_sasrec(fit, len(catalog), p, (fit, vt), log)
    p = replace(p, epochs=train_seq.best_epoch(curve))
    tmp = out.with_name(out.name + ".tmp")
    train_seq.build_bundle(tmp, catalog, hist, ts, p, version=f"panel-{out.name}",
                           ranker_weights=dict(train_seq.SEQ_RANKER_WEIGHTS), log=log, model=model, curve=curve,
                           extra={"training": {"fitted_on": f"central panel: {len(hist)} of {split.n_users} users "
                                               f"(share {share}, seed {seed}), their histories without the last "
                                               "title for the sequence model", "seconds": round(time.monotonic() - t0, 1)}})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    RankerBundle.load(out)
    log(f"panel start: {out} in {time.monotonic() - t0:.0f}s (best epoch {p.epochs})")
    return out, ps


def title_features(bundle) -> np.ndarray:
    """Public features of every title of `bundle` [n_items, 38], each column scaled to max |x| = 1:
    content (genres, decade, year: `bundle.content_features`), the panel's popularity (the bundle's
    two popularity columns) and whether the sequence model knows the title at all (a title the panel
    never watched has a zero embedding and no sequence score)."""
    from appliance.ranking.bundle import content_features

    cat = bundle.catalog()
    f = [content_features(cat.genres, cat.year), bundle.popularity]
    if bundle.sequence is not None:
        f.append(bundle.sequence.known.astype(np.float32)[:, None])
    f = np.hstack(f).astype(np.float64)
    return f / np.maximum(np.abs(f).max(axis=0), 1e-9)
