"""ONNX Runtime vs the original weights of our own emotion models, on every run (no PyTorch needed).

The committed `.pt` checkpoint (sha256 in the manifest) is recomputed in numpy float64 (`torchless.py`)
and compared with the committed ONNX file under ONNX Runtime, on random inputs and on face-like images.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from appliance.capture.synthetic_source import SyntheticFaceSource
from appliance.models.manifest import DEFAULT_MODELS_DIR, file_sha256, load_manifest
from tests.models.torchless import load_state_dict, vgg_probs

OWN_MODELS = ("emotion_vgg48_ms", "emotion_cnn48")


def _inputs(side: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    rand = rng.uniform(-1, 1, (8, side, side, 1))
    # face-like inputs: crops of the synthetic camera's photo (a real face), as the product scales them
    src = SyntheticFaceSource(width=640, height=360, fps=30)
    crops = []
    for n in range(0, 160, 10):  # the photo moves across the frame: the face box follows it
        x, y, w, h = src.face_box(n)
        gray = cv2.cvtColor(src.render(n), cv2.COLOR_BGR2GRAY)
        crops.append(cv2.resize(gray[max(y, 0):y + h, max(x, 0):x + w], (side, side)))
    faces = (np.stack(crops).astype(np.float32) / 255.0 - 0.5) * 2.0
    return np.concatenate([rand, faces[..., None], faces[:, :, ::-1, None]]).astype(np.float32)


@pytest.mark.parametrize("name", OWN_MODELS)
def test_onnx_runtime_matches_the_original_weights(name: str):
    entry = load_manifest(DEFAULT_MODELS_DIR).entry(name)
    ckpt = DEFAULT_MODELS_DIR / entry.source.path
    assert file_sha256(ckpt) == entry.source.sha256  # the weights the manifest says it was exported from
    log = json.loads((DEFAULT_MODELS_DIR / "emotion" / f"{name}.train.json").read_text())
    assert log["model"]["arch"] == "vgg"
    state = load_state_dict(ckpt)
    assert sum(v.size for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                    "num_batches_tracked"))) == log["model"]["params"]
    x = _inputs(entry.inputs[0].shape[1])
    ref = vgg_probs(state, tuple(log["model"]["widths"]), log["model"].get("stem", "stride"), x,
                    np.array(log["prior_correction"]["logit_shift"]))
    sess = ort.InferenceSession(str(DEFAULT_MODELS_DIR / entry.output.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert np.abs(ref - got).max() <= entry.parity.tolerance
    assert (ref.argmax(1) == got.argmax(1)).all()
    assert len(set(got.argmax(1).tolist())) > 1  # the inputs exercise more than one class


def test_a_tampered_checkpoint_is_noticed(tmp_path):
    """The reader and the comparison can fail: one flipped weight changes the recomputed output."""
    entry = load_manifest(DEFAULT_MODELS_DIR).entry("emotion_cnn48")
    log = json.loads((DEFAULT_MODELS_DIR / "emotion" / "emotion_cnn48.train.json").read_text())
    state = load_state_dict(DEFAULT_MODELS_DIR / entry.source.path)
    x = _inputs(48)[:8]
    shift = np.array(log["prior_correction"]["logit_shift"])
    widths = tuple(log["model"]["widths"])
    before = vgg_probs(state, widths, "stride", x, shift)
    state["fc.bias"] = state["fc.bias"] + np.array([3.0, 0, 0, 0, 0, 0, 0], np.float32)
    after = vgg_probs(state, widths, "stride", x, shift)
    assert np.abs(before - after).max() > entry.parity.tolerance
