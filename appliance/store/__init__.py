"""Durable local state in SQLite (WAL): profiles, consent, sessions, events, catalog, experiment exposures."""

from appliance.store.db import EventBatch, EventRow, ExposureRow, ProfileRow, SessionRow, Store, StoredBatch

__all__ = ["EventBatch", "EventRow", "ExposureRow", "ProfileRow", "SessionRow", "Store", "StoredBatch"]
