"""Our emotion training recipe and its exported model, checked against PyTorch (where torch is installed).

Marked `train`: these run in the training environment (`make train-emotion`, .venv-train) and are
skipped in the appliance's own environment, which has no torch. The parity test re-runs the committed
checkpoint in PyTorch and compares it with the committed ONNX file under ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.models.manifest import DEFAULT_MODELS_DIR, file_sha256, load_manifest
from appliance.vision.emotion import LABELS

pytestmark = pytest.mark.train

NAME = "emotion_cnn48"
SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "fer2013-sample"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def te(torch):
    from appliance.models import train_emotion

    return train_emotion


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(7)
    parts = [rng.uniform(-1, 1, (32, 48, 48, 1)).astype(np.float32)]
    imgs = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(SAMPLE.glob("*/*.jpg"))[::5]]
    if imgs:
        faces = ((np.stack(imgs).astype(np.float32) / 255.0 - 0.5) * 2.0)[..., None]
        parts += [faces, faces[:, :, ::-1]]
    return np.ascontiguousarray(np.concatenate(parts))


@pytest.mark.parametrize("name", [NAME, "emotion_vgg48_ms"])
def test_committed_onnx_matches_the_torch_checkpoint(torch, te, name: str):
    import onnxruntime as ort

    entry = load_manifest(DEFAULT_MODELS_DIR).entry(name)
    ckpt = DEFAULT_MODELS_DIR / entry.source.path
    assert file_sha256(ckpt) == entry.source.sha256
    log = json.loads((DEFAULT_MODELS_DIR / "emotion" / f"{name}.train.json").read_text())
    model = te.build_model(log["model"]["arch"], tuple(log["model"]["widths"]), log["args"]["dropout"],
                           log["model"].get("stem", "stride"))
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    wrapped = te.export_wrapper(model, np.array(log["prior_correction"]["logit_shift"], np.float32))
    x = _inputs()
    with torch.no_grad():
        ref = wrapped(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(DEFAULT_MODELS_DIR / entry.output.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert np.abs(ref - got).max() <= entry.parity.tolerance
    assert (ref.argmax(1) == got.argmax(1)).all()
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_split_keeps_duplicates_on_one_side(te):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 48, 48), dtype=np.uint8)
    y = rng.integers(0, len(LABELS), 200)
    x[100:120] = x[0:20]  # twins
    y[100:120] = y[0:20]
    tr, va = te.split_train_val(x, y, 0.2, seed=1)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 200
    train_px = {x[i].tobytes() for i in tr}
    assert not any(x[i].tobytes() in train_px for i in va)
    again = te.split_train_val(x, y, 0.2, seed=1)
    assert (again[0] == tr).all() and (again[1] == va).all()  # deterministic


def test_augment_keeps_shape_and_range(torch, te):
    args = te.parse_args(["--data", "unused"])
    gen = torch.Generator().manual_seed(0)
    x = te.to_input(torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8))
    out = te.augment(x, gen, args)
    assert out.shape == (16, 1, 48, 48) and out.min() >= -1.0 and out.max() <= 1.0


def _tiny_folder(data: Path) -> None:
    rng = np.random.default_rng(3)
    rows = ["path,label"]
    for c, label in enumerate(LABELS):
        (data / label).mkdir(parents=True)
        for k in range(24):
            img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
            img[8 + c * 4:16 + c * 4, 8:40] = 255  # a class-dependent bar, learnable
            cv2.imwrite(str(data / label / f"{k}.png"), img)
            rows.append(f"{label}/{k}.png,{label}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")


def test_recipe_runs_end_to_end_on_a_tiny_set(torch, te, tmp_path: Path):
    """Two tiny epochs on a made-up labelled folder: trains, exports, checks parity, writes a manifest entry."""
    data = tmp_path / "data"
    _tiny_folder(data)
    models = tmp_path / "models"
    models.mkdir()
    rc = te.main(["--data", str(data), "--out", str(models / "emotion"), "--epochs", "2", "--batch", "32",
                  "--widths", "8,8,16,16", "--val-frac", "0.25", "--threads", "1"])
    assert rc == 0
    entry = load_manifest(models).entry(NAME)
    assert entry.source.package == "own-recipe" and entry.source.dataset_labels_sha256 == file_sha256(data / "labels.csv")
    assert entry.parity.max_abs_diff <= entry.parity.tolerance
    assert (models / entry.output.path).stat().st_size == entry.output.bytes


def test_pack_decodes_to_the_same_pixels(tmp_path: Path):
    """The one-file pack a GPU machine trains from holds exactly the folder's images and labels (no torch)."""
    from appliance.models import train_emotion as te

    data = tmp_path / "data"
    _tiny_folder(data)
    te.main(["--data", str(data), "--pack", str(tmp_path / "pack.npz")])
    x_dir, y_dir, _ = te.load_fer_folder(data)
    x_pack, y_pack, _ = te.load_fer_folder(tmp_path / "pack.npz")
    assert (x_dir == x_pack).all() and (y_dir == y_pack).all()
    assert te.labels_digest(tmp_path / "pack.npz") == file_sha256(data / "labels.csv")


def test_checkpoint_trained_elsewhere_exports_with_the_same_split(torch, te, tmp_path: Path):
    """--save-ckpt (as the GPU job writes) then --from-ckpt here: same weights, parity, a manifest entry."""
    data = tmp_path / "data"
    _tiny_folder(data)
    te.main(["--data", str(data), "--pack", str(tmp_path / "pack.npz")])
    rc = te.main(["--data", str(tmp_path / "pack.npz"), "--epochs", "2", "--batch", "32", "--widths", "8,8,16,16",
                  "--stem", "full", "--val-frac", "0.25", "--name", "emotion_tiny", "--recipe-version", "t1",
                  "--save-ckpt", str(tmp_path / "ckpt"), "--no-export"])
    assert rc == 0
    summary = json.loads((tmp_path / "ckpt" / "emotion_tiny.summary.json").read_text())
    assert summary["epochs"] == 2 and summary["checkpoint_dtype"] == "float32"
    models = tmp_path / "models"
    models.mkdir()
    rc = te.main(["--data", str(data), "--from-ckpt", str(tmp_path / "ckpt" / "emotion_tiny.ckpt.pt"),
                  "--out", str(models / "emotion")])
    assert rc == 0
    entry = load_manifest(models).entry("emotion_tiny")
    assert entry.version == "own-t1+onnx17" and entry.parity.max_abs_diff <= entry.parity.tolerance
    log = json.loads((models / "emotion" / "emotion_tiny.train.json").read_text())
    assert log["exported_from"] == "emotion_tiny.ckpt.pt" and log["val"]["chosen"]["tau"] in (0.0, 0.25, 0.5, 0.75, 1.0)
