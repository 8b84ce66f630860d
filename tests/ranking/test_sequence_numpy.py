"""The sequence encoder in numpy against ONNX Runtime on the shipped bundle, and bad model files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.ranking.bundle import RankerBundle
from appliance.ranking.sequence import SequenceModel
from appliance.ranking.sequence_numpy import NumpySasrec

from .conftest import BUNDLE_DIR

ONNX = Path(BUNDLE_DIR) / "sequence.onnx"


@pytest.fixture(scope="module")
def pair(bundle):
    """The same bundle's encoder on both runtimes."""
    table, n = bundle.sequence.table, bundle.sequence.max_len
    return SequenceModel(ONNX, table, n, 1, "numpy"), SequenceModel(ONNX, table, n, 1, "onnxruntime")


def _histories(model: SequenceModel, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    known = np.flatnonzero(model.known)
    lens = np.r_[0, 1, 2, model.max_len - 1, model.max_len, model.max_len + 7, rng.integers(0, 60, 60)]
    hist = [rng.choice(known, int(n)) for n in lens]
    hist.append(np.flatnonzero(~model.known)[:3])  # only titles the model never saw: the empty history's query
    return hist


def test_numpy_matches_onnx_runtime_one_history_at_a_time(pair, bundle) -> None:
    ours, ref = pair
    atol = bundle.manifest["sequence"]["parity"]["atol"]
    for h in _histories(ours):
        got, want = ours.encode(h), ref.encode(h)
        assert got.dtype == np.float32 and got.shape == want.shape == (ours.dim,)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    # The scores the ranker derives from the query agree as closely (the query is O(1) after the final norm).
    q = _histories(ours)[10]
    np.testing.assert_allclose(ours.table @ ours.encode(q), ref.table @ ref.encode(q), rtol=0, atol=1e-3)


def test_numpy_matches_onnx_runtime_in_batches(pair, bundle) -> None:
    ours, ref = pair
    hist = _histories(ours, seed=4)
    got, want = ours.encode_batch(hist), ref.encode_batch(hist)
    assert got.shape == want.shape == (len(hist), ours.dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=bundle.manifest["sequence"]["parity"]["atol"])
    # one at a time (real positions only) and in a padded batch: the same queries
    np.testing.assert_allclose(np.stack([ours.encode(h) for h in hist]), got, rtol=0, atol=1e-5)


def test_a_different_history_gives_a_different_query(pair) -> None:
    ours, _ = pair
    known = np.flatnonzero(ours.known)
    a, b = ours.encode(known[:5]), ours.encode(known[5:10])
    assert np.abs(a - b).max() > 1e-2
    assert np.array_equal(ours.encode(known[:5]), a)  # cached: the same array again


def test_bad_model_files_are_clear_errors(tmp_path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(ONNX.read_bytes()[:5000])
    with pytest.raises(ModelError, match="not an ONNX model|has no"):
        NumpySasrec(cut, 50, 1)
    with pytest.raises(ModelError, match="cannot read"):
        NumpySasrec(tmp_path / "missing.onnx", 50, 1)
    with pytest.raises(ModelError, match=r"pos\.weight has shape"):
        NumpySasrec(ONNX, 40, 1)  # a max_len the graph was not built for
    with pytest.raises(ModelError, match="not a multiple of heads"):
        NumpySasrec(ONNX, 50, 3)


def test_a_graph_without_a_layer_is_refused(tmp_path) -> None:
    """Renaming one MatMul (as an export of some other architecture would have it) must not be misread."""
    data = ONNX.read_bytes()
    name = b"/blocks.1/ff/ff.3/MatMul"
    assert data.count(name) >= 1  # the node and its output names (same length: the file stays valid)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(name, b"/blocks.1/ff/ff.9/MatMul"))
    with pytest.raises(ModelError, match=r"no MatMul for 'blocks\.1\.ff\.3'"):
        NumpySasrec(bad, 50, 1)


def test_the_runtime_is_a_validated_choice(bundle) -> None:
    with pytest.raises(ValueError, match="sequence runtime"):
        SequenceModel(ONNX, bundle.sequence.table, 50, 1, "tensorflow")
    assert RankerBundle.load(BUNDLE_DIR, "numpy").sequence.session is None


def test_the_ranker_process_does_not_load_onnx_runtime(tmp_path) -> None:
    """With its default config the ranker's whole start path leaves onnxruntime unimported (its ~40 MB)."""
    code = (
        "import sys\n"
        "from appliance.config import default_config\n"
        "from appliance.serving.process import RankerProcess\n"
        f"cfg = default_config().with_overrides(run_dir={str(tmp_path / 'run')!r}, "
        f"data_dir={str(tmp_path / 'data')!r}, metrics={{'ranker_port': 0}})\n"
        "p = RankerProcess(cfg)\n"
        "try:\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime'))\n"
        "finally:\n"
        "    p.stop()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- the C query (_seqcore.c) ------------------------------------------------------------------------------

def _seqcore():
    try:
        from appliance.ranking import _seqcore
    except ImportError:  # only acceptable where the build could not compile it
        if shutil.which("cc") and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
            raise
        pytest.skip("no C compiler here: the encoder's query runs as numpy")
    return _seqcore


def test_the_c_query_matches_the_numpy_pass_and_onnx_runtime(pair, bundle) -> None:
    _seqcore()
    ours, ref = pair
    c = NumpySasrec(ONNX, ours.max_len, 1)
    plain = NumpySasrec(ONNX, ours.max_len, 1, native=False)
    if not c.native:
        pytest.skip("APPLIANCE_RANK_NATIVE=0: the C path is off")
    assert not plain.native
    atol = bundle.manifest["sequence"]["parity"]["atol"]
    for seed in (5, 6):
        for h in _histories(ours, seed):
            h = h[ours.known[h]][-ours.max_len:]
            got = c.query(h)
            assert got.dtype == np.float32 and got.shape == (ours.dim,)
            np.testing.assert_allclose(got, plain.query(h), rtol=0, atol=1e-5)
            np.testing.assert_allclose(got, ref.encode(h), rtol=0, atol=atol)


def test_the_c_query_refuses_bad_input(pair) -> None:
    core = _seqcore()
    c = NumpySasrec(ONNX, pair[0].max_len, 1)
    if not c.native:
        pytest.skip("APPLIANCE_RANK_NATIVE=0: the C path is off")
    out = np.empty(c.d, np.float32)
    args = [c.item, c.pos, c._packed, c._final_ln]
    ok = np.array([1, 2, 3], np.int64)
    core.query(*args, ok, out, 1, c.eps)  # the happy path, for contrast
    with pytest.raises(IndexError, match="outside"):
        core.query(*args, np.array([1, c.n_items + 1], np.int64), out, 1, c.eps)
    with pytest.raises(IndexError, match="outside"):
        core.query(*args, np.array([-1], np.int64), out, 1, c.eps)
    with pytest.raises(ValueError, match="positions"):
        core.query(*args, np.ones(c.max_len + 1, np.int64), out, 1, c.eps)
    with pytest.raises(ValueError, match="positions"):
        core.query(*args, np.zeros(0, np.int64), out, 1, c.eps)
    with pytest.raises(ValueError, match="whole number"):
        core.query(c.item, c.pos, c._packed[:-1], c._final_ln, ok, out, 1, c.eps)
    with pytest.raises(ValueError, match="multiple of heads"):
        core.query(*args, ok, out, 3, c.eps)
    with pytest.raises(TypeError, match="writable"):
        core.query(*args, ok, bytes(4 * c.d), 1, c.eps)
    with pytest.raises(TypeError):
        core.query(*args, ok, out, 1)
    with pytest.raises(TypeError, match="buffer"):
        core.query(*args, [1, 2], out, 1, c.eps)


def test_the_c_query_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_RANK_NATIVE", "0")
    assert not NumpySasrec(ONNX, 50, 1).native
