"""A box's side of federated training: its (prefix -> next title) examples, from its own store.

The ClientApp on a box reads the household's events from the box's SQLite store and the ranking
bundle it already serves, and turns them into what `HeadClient` trains on: query vectors of the
sequence model and bundle rows of the next title. Item ids, titles, timestamps and event values stay
in this process; what leaves the box is the clipped, SecAgg+-masked head delta (tests/federation/
test_wire.py captures the bytes on the wire and checks).

A title counts as watched when the household played, liked or completed it (the ranker's "positive"
titles, `fusion.state`); a title watched again moves to the end, as in the ranker's history.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from appliance.federation.model import examples_from_history

PLAY, LIKE, COMPLETE = 1, 5, 7  # appliance.v1.EventType
POSITIVE_TYPES = frozenset({PLAY, LIKE, COMPLETE})


def watched_titles(store, profile_id: str | None = None) -> np.ndarray:
    """Item ids the box's household watched (played, liked, completed), oldest first, each once at the
    place it was last watched."""
    seen: OrderedDict[int, None] = OrderedDict()
    for batch in store.iter_batches(profile_id):
        for t, item in zip(batch.types.tolist(), batch.item_ids.tolist()):
            if t in POSITIVE_TYPES:
                seen.pop(item, None)
                seen[item] = None
    return np.fromiter(seen, dtype=np.int64, count=len(seen))


def box_examples(store, bundle, max_examples: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(queries [n, d] float32, targets [n] bundle rows) of the box's watched titles the bundle knows."""
    if bundle.sequence is None:
        raise ValueError("the bundle has no sequence model to fine-tune a head on")
    ids = watched_titles(store)
    pos = np.clip(np.searchsorted(bundle.item_ids, ids), 0, len(bundle.item_ids) - 1)
    rows = pos[bundle.item_ids[pos] == ids]
    pairs = examples_from_history(rows, max_examples)
    if not pairs:
        return np.zeros((0, bundle.sequence.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    queries = bundle.sequence.encode_batch([p for p, _ in pairs]).astype(np.float32)
    return queries, np.array([t for _, t in pairs], dtype=np.int64)


def load_box(node_config: dict[str, Any]):
    """`make_client_app` data source on a box: node config `store` (the box's SQLite file), `bundle`
    (the served ranking bundle) and optionally `max-examples` and `features` (true when the run's head
    weighs public title features)."""
    from appliance.federation.panel import title_features
    from appliance.ranking.bundle import RankerBundle
    from appliance.store.db import Store

    bundle = RankerBundle.load(Path(str(node_config["bundle"])))
    store = Store(Path(str(node_config["store"])))
    try:
        queries, targets = box_examples(store, bundle, int(node_config.get("max-examples", 50)))
    finally:
        store.close()
    items = bundle.sequence.table.astype(np.float32)
    features = title_features(bundle).astype(np.float32) if node_config.get("features") else None
    return queries, targets, items, None, features
