"""Ed25519 signatures over a bundle's manifest. The manifest lists the sha256 of every file in the
bundle, so one signature over its bytes covers the whole bundle; verifying the files against the
manifest is the loader's job (RankerBundle.load, verify_models)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import ApplianceError

SIGNATURE_FILE = "manifest.sig"


class SignatureError(ApplianceError):
    """A bundle is unsigned, signed by another key, or changed after signing."""


def generate_key() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a new Ed25519 key (the service's release key)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _files_digest(bundle: Path) -> bytes:
    """The manifest's bytes plus a digest of every file it lists (so a file swap breaks the signature too)."""
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    listed = manifest.get("files") or {m["output"]["path"]: {} for m in manifest.get("models", {}).values()}
    h = hashlib.sha256(manifest_bytes)
    for name in sorted(listed):
        path = (bundle / name).resolve()
        if bundle.resolve() not in path.parents:
            raise SignatureError(f"{bundle}: manifest lists a file outside the bundle: {name}")
        h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def sign_bundle(bundle: Path, private_pem: bytes) -> Path:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("release key must be Ed25519")
    sig = key.sign(_files_digest(bundle))
    out = bundle / SIGNATURE_FILE
    out.write_text(base64.b64encode(sig).decode() + "\n")
    return out


def verify_bundle(bundle: Path, public_pem: bytes) -> None:
    """Raise SignatureError unless the bundle carries a valid signature by this key."""
    sig_path = bundle / SIGNATURE_FILE
    if not sig_path.is_file():
        raise SignatureError(f"{bundle}: not signed ({SIGNATURE_FILE} missing)")
    try:
        key = serialization.load_pem_public_key(public_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError("trusted key must be Ed25519")
        key.verify(base64.b64decode(sig_path.read_text().strip(), validate=True), _files_digest(bundle))
    except (InvalidSignature, ValueError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise SignatureError(f"{bundle}: signature does not verify ({type(exc).__name__}): refused") from None
