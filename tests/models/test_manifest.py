from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

from appliance.errors import ModelError
from appliance.models.manifest import (
    DEFAULT_MODELS_DIR,
    TrainedSource,
    file_sha256,
    load_manifest,
    model_path,
    verify_models,
)
from appliance.vision.emotion import LABELS

REPO = Path(__file__).resolve().parents[2]
# shared/datasets/README.md: sha256 of fer2013-train/labels.csv
FER2013_TRAIN_LABELS_SHA256 = "78e3cd9d698d8fddbb28ef9d2a67f0303b5bda7e849bcdab09bb959309e3aa40"


@pytest.fixture
def models_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    for entry in manifest.models.values():
        (dst / entry.output.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DEFAULT_MODELS_DIR / entry.output.path, dst / entry.output.path)
    shutil.copy2(DEFAULT_MODELS_DIR / "manifest.json", dst / "manifest.json")
    return dst


def test_committed_models_verify():
    manifest = verify_models(DEFAULT_MODELS_DIR)
    assert set(manifest.models) == {"blazeface_short_range", "fer_mini_xception", "emotion_cnn48", "emotion_cnn48_int8",
                                    "emotion_vgg48_ms"}
    emo = manifest.entry("fer_mini_xception")
    assert tuple(emo.labels) == LABELS
    assert emo.task == "emotion" and emo.opset == 17 and emo.source.license == "MIT"
    assert emo.inputs[0].shape == ["N", 64, 64, 1]
    det = manifest.entry("blazeface_short_range")
    assert det.source.license == "Apache-2.0" and det.inputs[0].shape == [1, "height", 128, 3]
    for e in manifest.models.values():
        assert e.parity.max_abs_diff <= e.parity.tolerance
        # a conversion keeps every decision; a quantisation (checked in test_int8_model.py) nearly every one
        assert e.parity.argmax_agreement == 1.0 or (e.source.package == "own-quantization"
                                                    and e.parity.argmax_agreement >= 0.97)
        assert e.output.bytes == (DEFAULT_MODELS_DIR / e.output.path).stat().st_size
        assert e.tag.startswith(f"{e.name}@") and e.output.sha256[:12] in e.tag


@pytest.mark.parametrize("name", ["emotion_cnn48", "emotion_vgg48_ms"])
def test_own_emotion_model_is_recorded(name: str):
    """Our trained models: recipe, data set (by the sha256 of its labels.csv), seed, checkpoint, edge size."""
    manifest = verify_models(DEFAULT_MODELS_DIR)
    own = manifest.entry(name)
    assert isinstance(own.source, TrainedSource) and own.source.package == "own-recipe"
    assert (REPO / own.source.recipe).is_file() and own.source.recipe == "appliance/models/train_emotion.py"
    assert own.source.dataset_labels_sha256 == FER2013_TRAIN_LABELS_SHA256
    assert own.source.seed == 2013 and 0.0 < own.source.val_accuracy < 1.0
    ckpt = DEFAULT_MODELS_DIR / own.source.path
    assert ckpt.is_file() and file_sha256(ckpt) == own.source.sha256
    assert own.task == "emotion" and own.opset == 17 and tuple(own.labels) == LABELS
    assert own.inputs[0].shape == ["N", 48, 48, 1] and own.inputs[0].dtype == "float32"
    assert own.outputs[0].shape == ["N", 7]
    assert own.output.bytes <= 5 * 1024 * 1024  # small enough for the edge
    assert own.parity.reference.startswith("torch ") and own.parity.n >= 100
    session = ort.InferenceSession(str(DEFAULT_MODELS_DIR / own.output.path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["dataset_labels_sha256"] == FER2013_TRAIN_LABELS_SHA256 and meta["seed"] == "2013"


def test_own_model_matches_the_shared_training_labels():
    labels_csv = REPO.parent / "shared" / "datasets" / "fer2013-train" / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"reference data not present: {labels_csv}")
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    for name in ("emotion_cnn48", "emotion_vgg48_ms"):
        assert file_sha256(labels_csv) == manifest.entry(name).source.dataset_labels_sha256


def test_onnx_files_carry_their_provenance():
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    for entry in manifest.models.values():
        session = ort.InferenceSession(str(DEFAULT_MODELS_DIR / entry.output.path),
                                       providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert meta["source_sha256"] == entry.source.sha256
        assert meta["license"] == entry.source.license


def test_manifest_is_deterministic_json():
    text = (DEFAULT_MODELS_DIR / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_model_path(models_copy: Path):
    assert model_path(models_copy, "fer_mini_xception") == models_copy / "emotion/fer_mini_xception.onnx"
    with pytest.raises(ModelError, match="no model named 'nope'.*blazeface_short_range"):
        model_path(models_copy, "nope")


def test_tampered_model_names_the_file(models_copy: Path):
    verify_models(models_copy)
    target = models_copy / "emotion" / "fer_mini_xception.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelError) as err:
        verify_models(models_copy)
    msg = str(err.value)
    assert "fer_mini_xception" in msg and str(target) in msg
    assert load_manifest(models_copy).entry("fer_mini_xception").output.sha256 in msg
    assert "make models" in msg


def test_missing_model_names_the_file(models_copy: Path):
    (models_copy / "detector" / "blazeface_short_range.onnx").unlink()
    with pytest.raises(ModelError, match="blazeface_short_range.onnx is missing.*make models"):
        verify_models(models_copy)


def test_bad_or_missing_manifest(models_copy: Path):
    (models_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid model manifest"):
        load_manifest(models_copy)
    (models_copy / "manifest.json").unlink()
    with pytest.raises(ModelError, match="cannot read the model manifest"):
        verify_models(models_copy)


def test_verify_cli(models_copy: Path):
    from typer.testing import CliRunner

    from appliance.models.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", "--models-dir", str(models_copy)])
    assert ok.exit_code == 0, ok.output
    assert "fer_mini_xception" in ok.output and "ok" in ok.output
    (models_copy / "detector" / "blazeface_short_range.onnx").write_bytes(b"garbage")
    bad = runner.invoke(app, ["verify", "--models-dir", str(models_copy)])
    assert bad.exit_code == 1
    assert "blazeface_short_range" in bad.output
