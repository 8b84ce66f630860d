"""One root for every error the appliance raises on purpose, so callers can tell ours from bugs."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of all appliance errors."""


class ConfigError(ApplianceError):
    """A firmware config is missing, unreadable or invalid (the message names the field)."""


class ModelError(ApplianceError):
    """A model file is missing, corrupt (checksum), or cannot be loaded by any execution provider."""


class CaptureError(ApplianceError):
    """A capture source cannot be opened or stopped delivering frames."""


class ConsentError(ApplianceError):
    """An operation needs camera consent that was not given."""


class StoreError(ApplianceError):
    """The local store cannot read or write (disk full, corruption, schema mismatch)."""


class ValidationError(ApplianceError):
    """A request is malformed; the message says which field and why."""


class NotFoundError(ApplianceError):
    """A session, profile or item the request names does not exist."""
