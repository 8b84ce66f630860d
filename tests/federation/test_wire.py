"""Wire test (issue 8, Must show): what a box sends to the aggregator carries no item id, no event, no
title and no pixel, and no single box's unmasked update ever reaches the server.

Each box is real: its household's events in its own SQLite store (`appliance.store`), the shipped
ranking bundle, the box's ClientApp (`federation.box.load_box` -> HeadClient, SecAgg+, clipping). The
loopback test records every byte each SuperNode sends to the SuperLink through a TCP relay
(`wiretap.TcpTap`; Flower 1.41's Fleet API is protobuf over plain HTTP with --insecure) and searches
it; the in-process test runs the same search over Flower's serialised messages (LocalGrid), in CI.

What is searched for, per box: its watched titles' item ids (decimal text, int64/float64 bytes,
protobuf integer fields, elements of any numpy array), their titles (UTF-8), its events (profile and
session ids, client timestamps as text/int64/varint/protobuf field/array element, dwell values as
float32/float64 array elements) and every 16-byte block of a camera frame it holds. Item ids are
taken >= 10,000 so that a 4-byte-or-shorter encoding of one never needs a raw-byte search (random
masked bytes would match those by chance); `test_the_search_finds_what_a_leaky_box_would_send` shows
the search finds each kind when it is there.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from appliance.federation.box import box_examples, load_box, watched_titles  # noqa: E402
from appliance.federation.flower_app import RunSettings, make_client_app, run_server  # noqa: E402
from appliance.federation.local_grid import LocalGrid  # noqa: E402
from appliance.federation.model import HeadShape, client_update, round_subset  # noqa: E402
from appliance.federation.wiretap import http_requests, npy_arrays, varints  # noqa: E402
from appliance.ranking.bundle import RankerBundle  # noqa: E402
from appliance.store.db import Store  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "ranker"
PLAY, DWELL, COMPLETE, BROWSE = 1, 8, 7, 9


@dataclass
class Box:
    store: Path
    item_ids: list[int]
    titles: list[str]
    profile: str
    session: str
    times: list[int]
    dwell: list[float]
    frame: np.ndarray


@pytest.fixture(scope="module")
def bundle() -> RankerBundle:
    if not (BUNDLE / "sequence.onnx").exists():
        pytest.skip("no ranking bundle with a sequence model")
    return RankerBundle.load(BUNDLE)


pytestmark = pytest.mark.usefixtures("quiet_flower")


def make_box(root: Path, bundle: RankerBundle, b: int, n_titles: int = 30) -> Box:
    """A household's box: browse/play/dwell/complete events over `n_titles` titles, the catalog rows of
    what it watched, and the last camera frame it captured (a textured 64x64 RGB image)."""
    rng = np.random.default_rng(100 + b)
    known = bundle.item_ids[bundle.sequence.known & (bundle.item_ids >= 10_000)]
    ids = [int(i) for i in rng.choice(known, size=n_titles, replace=False)]
    by_id = {r.item_id: r for r in bundle.catalog_rows}
    d = root / f"box{b}"
    store = Store(d / "store.db")
    profile, session = f"household-{uuid.uuid4().hex}", f"session-{uuid.uuid4().hex}"
    t0 = 1_733_000_000_000 + b * 86_400_000 + int(rng.integers(1_000_000))
    store.ensure_profile(profile, t0)
    store.set_consent(profile, True, t0)
    store.start_session(session, profile, 1, t0)
    rows, times, dwell = [], [], []
    for j, item in enumerate(ids):
        t = t0 + 3_600_000 * j + int(rng.integers(1, 60_000))
        v = round(float(rng.uniform(30, 5000)), 3)
        rows += [(BROWSE, item, t, 0.0), (PLAY, item, t + 1_013, 0.0), (DWELL, item, t + 2_029, v),
                 (COMPLETE, item, t + 5_400_017, 0.0)]
        times += [t, t + 1_013, t + 2_029, t + 5_400_017]
        dwell.append(float(np.float32(v)))
    store.append_events(profile, session, rows, t0 + 3_600_000 * n_titles)
    store.import_catalog([(i, by_id[i].title, "|".join(by_id[i].genres), by_id[i].year, by_id[i].maturity)
                          for i in ids])
    store.close()
    frame = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    np.save(d / "last_frame.npy", frame)
    return Box(d / "store.db", ids, [by_id[i].title for i in ids], profile, session, times, dwell, frame)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(n: int) -> re.Pattern:
    return re.compile(rb"(?<![0-9A-Za-z])" + str(n).encode() + rb"(?![0-9A-Za-z])")


def leaks(bodies: list[bytes], raw: bytes, box: Box) -> list[str]:
    """Every trace of `box`'s private data in what it sent: `bodies` are its messages (protobuf), `raw`
    everything it put on the wire (for the in-process grid, the same bytes)."""
    found = []
    blob = b"\n".join(bodies)
    byte_patterns = (
        [("item id", struct.pack("<q", i)) for i in box.item_ids]
        + [("item id", struct.pack("<d", i)) for i in box.item_ids]
        + [("title", t.encode()) for t in box.titles]
        + [("title", re.sub(r"\s*\(\d{4}\)\s*$", "", t).encode()) for t in box.titles
           if len(re.sub(r"\s*\(\d{4}\)\s*$", "", t)) >= 8]
        + [("event", box.profile.encode()), ("event", box.session.encode())]
        + [("event", struct.pack("<q", t)) for t in box.times] + [("event", _varint(t)) for t in box.times]
        + [("event", struct.pack("<d", v)) for v in box.dwell]
        + [("pixel", box.frame.tobytes()[i:i + 16]) for i in range(0, box.frame.size, 16)]
    )
    found += [f"{kind} {pat[:20]!r} in the raw bytes" for kind, pat in byte_patterns if pat in raw]
    found += [f"item id {i} as text" for i in box.item_ids if _text(i).search(blob)]
    found += [f"event time {t} as text" for t in box.times if _text(t).search(blob)]
    ints = {v for body in bodies for v in varints(body)}
    found += [f"item id {i} in a protobuf field" for i in set(box.item_ids) & ints]
    found += [f"event time {t} in a protobuf field" for t in set(box.times) & ints]
    for a in npy_arrays(raw):
        flat = a.ravel()
        if flat.dtype.kind in "iu" or flat.dtype.kind == "f":
            if np.isin(flat, box.item_ids).any():
                found.append(f"item id in an array {a.dtype}{a.shape}")
            if np.isin(flat, box.times).any():
                found.append(f"event time in an array {a.dtype}{a.shape}")
        if flat.dtype.kind == "f" and np.isin(flat.astype(np.float32), np.float32(box.dwell)).any():
            found.append(f"dwell value in an array {a.dtype}{a.shape}")
        if flat.dtype == np.uint8 and len(flat) >= 16 and flat.tobytes()[:16] in box.frame.tobytes():
            found.append(f"pixels in an array {a.shape}")
    return found


def unmasked_copies(raw: bytes, own: np.ndarray, s: RunSettings) -> list[str]:
    """Arrays in what a box sent that are (or, after SecAgg+'s dequantisation, look like) its own
    clipped update: any float array close to it, any integer array that dequantises close to it or
    correlates with it."""
    from flwr.common.secure_aggregation.quantization import dequantize

    out = []
    for a in npy_arrays(raw):
        flat = a.ravel()
        if flat.shape != own.shape:
            continue
        if flat.dtype.kind == "f" and np.allclose(flat, own, atol=1e-4):
            out.append(f"float update {a.dtype}{a.shape}")
        if flat.dtype.kind in "iu":
            clear = dequantize([flat.astype(np.int64)], s.clip, s.quantization_range)[0]
            if np.allclose(clear, own, atol=1e-4) or abs(np.corrcoef(clear, own)[0, 1]) > 0.5:
                out.append(f"quantised update {a.dtype}{a.shape}")
    return out


def _settings(n_boxes: int, bundle: RankerBundle, **kw) -> RunSettings:
    shape = HeadShape(len(bundle.item_ids), bundle.sequence.dim, 4, 38)
    return RunSettings(rounds=1, epsilon=2.0, clip=0.25, population=n_boxes, cohort=n_boxes, sampling="full",
                       n_items=shape.n_items, dim=shape.dim, rank=shape.rank, n_feat=shape.n_feat,
                       compression=12.0, lr=5.0, lr_adapter=0.05, lr_features=0.5, **kw)


def true_update(s: RunSettings, box: Box, bundle: RankerBundle, k: int) -> np.ndarray:
    """The box's clipped round-1 update, recomputed from its store (what it would send unprotected)."""
    store = Store(box.store)
    try:
        q, t = box_examples(store, bundle)
    finally:
        store.close()
    from appliance.federation.panel import title_features

    theta32 = s.shape.initial(seed=s.head_seed).astype(np.float32).astype(np.float64)
    return client_update(s.shape, theta32, q, t, bundle.sequence.table.astype(np.float32), server_round=1,
                         run_seed=s.run_seed, k=k, clip=s.clip, lr=s.lr, lr_adapter=s.lr_adapter,
                         lr_features=s.lr_features, epochs=s.local_epochs, batch=s.batch, seed=1,
                         features=title_features(bundle).astype(np.float32))[0]


def test_the_box_trains_on_its_store(tmp_path, bundle):
    box = make_box(tmp_path, bundle, 0)
    store = Store(box.store)
    assert watched_titles(store).tolist() == box.item_ids          # played and completed, in order
    q, t = box_examples(store, bundle)
    store.close()
    assert q.shape == (29, bundle.sequence.dim) and bundle.item_ids[t].tolist() == box.item_ids[1:]
    queries, targets, items, _, feats = load_box({"store": str(box.store), "bundle": str(BUNDLE),
                                                  "features": True})
    np.testing.assert_array_equal(targets, t)
    assert items.shape == (len(bundle.item_ids), bundle.sequence.dim) and feats.shape == (len(bundle.item_ids), 38)


def test_the_search_finds_what_a_leaky_box_would_send(tmp_path, bundle):
    """The control: a box that put its history, titles, events, frame or clear update into its reply
    (as metrics, arrays, config) is caught, in Flower's own message encoding."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.serde import message_to_proto

    box = make_box(tmp_path, bundle, 0)
    s = _settings(1, bundle)
    own = true_update(s, box, bundle, k=900)

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0  # as LocalGrid.server_context

    def reply(content: RecordDict) -> bytes:
        msg = Message(content, dst_node_id=1, message_type="train")
        return message_to_proto(msg).SerializeToString()

    kinds = {
        "item id": RecordDict({"m": MetricRecord({"last": box.item_ids[-1]})}),
        "title": RecordDict({"c": ConfigRecord({"note": f"watched {box.titles[3]}"})}),
        "event": RecordDict({"c": ConfigRecord({"s": box.session})}),
        "event time": RecordDict({"a": ArrayRecord([np.array(box.times[:3])])}),
        "pixel": RecordDict({"a": ArrayRecord([box.frame[10:20]])}),
    }
    for kind, content in kinds.items():
        raw = reply(content)
        found = leaks([raw], raw, box)
        assert any(f.startswith(kind) for f in found), (kind, found)
    assert leaks([reply(RecordDict({"m": MetricRecord({"n": 1})}))], b"", box) == []
    clear = quantize([own], s.clip, s.quantization_range)[0]
    raw = reply(RecordDict({"a": ArrayRecord([clear]), "b": ArrayRecord([own])}))
    assert len(unmasked_copies(raw, own, s)) == 2
    from appliance.federation import packing

    s2 = _settings(1, bundle, pack=2)
    enc = packing.encode(own, packing.plan(2, 1, s2.clip), s2.clip, np.random.default_rng(0))
    raw = reply(RecordDict({"a": ArrayRecord([enc]), "b": ArrayRecord([enc.astype(np.int64) + packing.INT_OFFSET])}))
    assert len(packed_copies(raw, own, s2)) == 2


def packed_copies(raw: bytes, own: np.ndarray, s: RunSettings) -> list[str]:
    """With packing (`federation.packing`): integer arrays in what a box sent that, read as packed
    integers, unpack close to (or correlated with) its own clipped update."""
    from appliance.federation import packing

    spec = packing.plan(s.pack, s.cohort, s.clip)
    n = spec.packed_len(own.size)
    out = []
    for a in npy_arrays(raw):
        flat = a.ravel()
        if flat.dtype.kind not in "iuf" or flat.size != n:
            continue
        ints = np.rint(flat).astype(np.int64) if flat.dtype.kind == "f" else flat.astype(np.int64)
        for shifted in (ints, ints + packing.INT_OFFSET):
            clear = packing.dequantise(packing.unpack(shifted, own.size, spec), spec)
            if np.allclose(clear, own, atol=2 * spec.step) or abs(np.corrcoef(clear, own)[0, 1]) > 0.5:
                out.append(f"packed update {a.dtype}{a.shape}")
    return out


@pytest.mark.parametrize("pack", [1, 2])
def test_in_process_uploads_carry_nothing_of_the_box_and_only_masked_updates(tmp_path, bundle, pack):
    boxes = [make_box(tmp_path, bundle, b) for b in range(3)]
    s = _settings(3, bundle, timeout=30, pack=pack)
    app = make_client_app(load_box)
    grid = LocalGrid(app, [{"store": str(b.store), "bundle": str(BUNDLE), "features": True} for b in boxes],
                     s.to_run_config(), keep_raw=True)
    seen: list[np.ndarray] = []
    res = run_server(grid, grid.server_context(), audit=lambda rnd, arrays: seen.extend(arrays))
    assert not grid.errors and [(r.sampled, r.survivors) for r in res.rounds] == [(3, 3)]
    owns = [true_update(s, b, bundle, res.subset_k) for b in boxes]
    for i, box in enumerate(boxes):
        sent = [raw for nid, _, _, raw in grid.wire.raw_uploads if nid == 1000 + i]
        assert len(sent) == 4                                   # the four SecAgg+ stages
        raw = b"".join(sent)
        assert leaks(sent, raw, box) == []
        assert any(a.size == res.upload_ints for a in npy_arrays(raw))  # the masked vector is there ...
        assert unmasked_copies(raw, owns[i], s) == []                 # ... and is not the update
        if pack > 1:
            assert packed_copies(raw, owns[i], s) == []
    if pack == 1:
        assert_server_saw_only_the_aggregate(seen, owns, s)
    else:  # the server-side code gets the packed aggregate; unpacked, it is the mean and no box's update
        from appliance.federation import packing

        spec = packing.plan(pack, 3, s.clip)
        assert len(seen) == 3
        for a in seen:
            mean = packing.unpack_mean(a, 3, res.subset_k, spec) / 3
            np.testing.assert_allclose(mean, np.mean(owns, axis=0), atol=spec.step + 0.01 * s.clip)
            for own in owns:
                assert np.abs(mean - own).max() > 0.01 * s.clip


def assert_server_saw_only_the_aggregate(seen: list[np.ndarray], owns: list[np.ndarray], s: RunSettings) -> None:
    assert len(seen) == len(owns)
    mean = np.mean(owns, axis=0)
    for a in seen:
        np.testing.assert_allclose(a, mean, atol=1e-5)            # SecAgg+'s unmasked mean, for each box
        for own in owns:
            assert np.abs(a - own).max() > 100 * 2 * s.clip / s.quantization_range  # never one box's update


WIRE_APP = """
from pathlib import Path

import numpy as np
from flwr.server import ServerApp

from appliance.federation.box import load_box
from appliance.federation.flower_app import make_client_app, run_server

client_app = make_client_app(load_box)
server_app = ServerApp()


@server_app.main()
def main(grid, context):
    seen = []
    run_server(grid, context, audit=lambda rnd, arrays: seen.extend(arrays))
    np.save(Path(str(context.run_config["out-dir"])) / "server_saw.npy", np.array(seen))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loopback_wire_carries_nothing_of_the_box_and_only_masked_updates(tmp_path, bundle):
    """A secure DP round over the real transport (SuperLink, three SuperNodes, `flwr run`; ~100 s on two
    shared cores), every byte each box sends recorded on its way to the SuperLink."""
    psutil = pytest.importorskip("psutil")
    from appliance.federation.loopback import LoopbackFederation, write_app_project

    boxes = [make_box(tmp_path, bundle, b) for b in range(3)]
    s = _settings(3, bundle, timeout=90)
    app = write_app_project(tmp_path / "app", s.to_run_config(), serverapp="wire_app:server_app",
                            clientapp="wire_app:client_app")
    (app / "wire_app.py").write_text(WIRE_APP)
    out = tmp_path / "out"
    nodes = [{"store": str(b.store), "bundle": str(BUNDLE), "features": True} for b in boxes]
    with LoopbackFederation(tmp_path / "fed", nodes, tap=True) as fed:
        started = [p.pid for p in fed.procs]
        run_id = fed.run(app, {"out-dir": str(out)}, timeout=400)
        assert fed.status(run_id) == "finished:completed", fed.run_log(run_id)[-3000:]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in started)                                  # every process we started is gone
    result = json.loads((out / "result.json").read_text())
    assert [(r["round"], r["sampled"], r["survivors"], r["dropped"]) for r in result["rounds"]] == [(1, 3, 3, 0)]
    assert result["epsilon"] <= 2.0 and result["federated_params"] == s.shape.n_params
    k = result["subset_k"]
    head, start = np.load(out / "head.npy"), s.shape.initial(seed=s.head_seed)
    changed = np.flatnonzero(head != start)                             # only this round's aligned subset moved
    assert len(changed) and set(changed) <= set(round_subset(s.shape.n_params, k, 1, s.run_seed, always=s.shape.n_feat).tolist())
    owns = [true_update(s, b, bundle, k) for b in boxes]
    for i, (box, tap) in enumerate(zip(boxes, fed.taps)):
        raw = bytes(tap.sent)
        requests = [r for stream in tap.streams() for r in http_requests(stream)]
        assert requests and all(line.startswith("POST ") for line, _ in requests)
        bodies = [body for _, body in requests]
        assert leaks(bodies, raw, box) == [], i
        assert any(a.size == k for a in npy_arrays(raw)), i            # the masked vector went this way ...
        assert unmasked_copies(raw, owns[i], s) == [], i                # ... and is not the update
    assert_server_saw_only_the_aggregate(list(np.load(out / "server_saw.npy")), owns, s)
