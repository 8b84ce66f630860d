"""The model manifest: what each committed ONNX file is, where it came from, and its checksum.

The box loads models only after `verify_models` has matched every file against the manifest, so a
truncated copy or a swapped file fails at start with a message that names it, not as a wrong emotion.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.errors import ModelError

MANIFEST_NAME = "manifest.json"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
_FIX = "Run `make models` to rebuild them, or reinstall the appliance to restore the shipped files."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    shape: list[int | str]  # a name marks a dynamic dimension: "N" a batch, "height" the detector rows
    dtype: str


class SourceInfo(_Strict):
    """Where the weights came from: a file inside a pinned PyPI wheel."""

    package: str
    version: str
    path: str = Field(description="path of the weights file inside the wheel")
    sha256: str
    wheel: str
    wheel_sha256: str
    license: str


class TrainedSource(_Strict):
    """Where the weights came from: our own training recipe, run on a named data set.

    `path`/`sha256` name the PyTorch checkpoint the ONNX file was exported from (the "original weights"
    of the torch-vs-ONNX parity check), kept beside the ONNX file.
    """

    package: Literal["own-recipe"]
    recipe: str = Field(description="path of the training script in this repository")
    recipe_version: str
    commit: str = Field(description="git commit the recipe ran at (+uncommitted-recipe if it was edited)")
    seed: int
    dataset: str
    dataset_labels_sha256: str = Field(description="sha256 of the data set's labels.csv")
    path: str = Field(description="checkpoint, relative to the models directory")
    sha256: str
    license: str
    trained_at: str
    val_accuracy: float = Field(description="on the held-out part of the training split")
    val_balanced_accuracy: float


class QuantizedSource(_Strict):
    """Where the weights came from: one of our models, statically quantised by our recipe (INT8, QDQ)."""

    package: Literal["own-quantization"]
    recipe: str = Field(description="path of the quantisation script in this repository")
    recipe_version: str
    base_model: str = Field(description="manifest entry that was quantised")
    sha256: str = Field(description="sha256 of the base model's ONNX file (what was quantised)")
    seed: int
    calibration: str
    calibration_labels_sha256: str = Field(description="sha256 of the calibration data set's labels.csv")
    fp32_nodes: list[str] = Field(description="nodes kept in FP32")
    license: str
    quantized_at: str


class OutputInfo(_Strict):
    path: str = Field(description="relative to the models directory")
    sha256: str
    bytes: int = Field(ge=1)


class ParityInfo(_Strict):
    """How closely the ONNX model matched the original runtime at build time."""

    reference: str
    tolerance: float
    max_abs_diff: float
    argmax_agreement: float
    n: int


class ModelEntry(_Strict):
    name: str
    version: str
    task: Literal["face_detection", "emotion"]
    source: SourceInfo | TrainedSource | QuantizedSource
    output: OutputInfo
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: str
    labels: list[str]
    parity: ParityInfo
    converter: dict[str, str]

    @property
    def tag(self) -> str:
        """Short, stable model version for affect samples and metrics: name@version#sha256[:12]."""
        return f"{self.name}@{self.version}#{self.output.sha256[:12]}"


class Manifest(_Strict):
    schema_version: Literal[1]
    built_at: str
    models: dict[str, ModelEntry]

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise ModelError(f"no model named {name!r} in the manifest; known: {sorted(self.models)}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(models_dir: Path = DEFAULT_MODELS_DIR) -> Manifest:
    """Read and validate `<models_dir>/manifest.json`."""
    path = Path(models_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model manifest ({exc.strerror}). {_FIX}") from None
    try:
        return Manifest.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelError(f"{path}: invalid model manifest: {exc}. {_FIX}") from None


def model_path(models_dir: Path, name: str) -> Path:
    """Path of a model's ONNX file, e.g. model_path(dir, "fer_mini_xception")."""
    return Path(models_dir) / load_manifest(models_dir).entry(name).output.path


def verify_models(models_dir: Path = DEFAULT_MODELS_DIR) -> Manifest:
    """Check that every model file exists with the size and sha256 the manifest records."""
    models_dir = Path(models_dir)
    manifest = load_manifest(models_dir)
    for name, entry in sorted(manifest.models.items()):
        path = models_dir / entry.output.path
        if not path.is_file():
            raise ModelError(f"model {name}: file {path} is missing. {_FIX}")
        actual = file_sha256(path)
        if actual != entry.output.sha256:
            raise ModelError(f"model {name}: file {path} is corrupt or was replaced: sha256 {actual}, "
                             f"manifest expects {entry.output.sha256} ({path.stat().st_size} bytes, expected "
                             f"{entry.output.bytes}). {_FIX}")
    return manifest
