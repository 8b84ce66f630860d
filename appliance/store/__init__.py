"""Durable local state in SQLite (WAL): profiles, consent, sessions, events, catalog."""

from appliance.store.db import EventRow, ProfileRow, SessionRow, Store

__all__ = ["EventRow", "ProfileRow", "SessionRow", "Store"]
