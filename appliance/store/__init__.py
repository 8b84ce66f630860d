"""Durable local state in SQLite (WAL): profiles, consent, sessions, events, catalog."""

from appliance.store.db import EventBatch, EventRow, ProfileRow, SessionRow, Store, StoredBatch

__all__ = ["EventBatch", "EventRow", "ProfileRow", "SessionRow", "Store", "StoredBatch"]
