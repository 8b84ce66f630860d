"""Fusion: per-profile, per-session and room-affect state the ranker reads."""

from appliance.fusion.state import (
    BROWSE,
    COMPLETE,
    DISLIKE,
    DWELL,
    LIKE,
    PAUSE,
    PLAY,
    SEEK,
    SKIP,
    AffectState,
    Positive,
    ProfileState,
    SessionState,
)

__all__ = [
    "BROWSE",
    "COMPLETE",
    "DISLIKE",
    "DWELL",
    "LIKE",
    "PAUSE",
    "PLAY",
    "SEEK",
    "SKIP",
    "AffectState",
    "Positive",
    "ProfileState",
    "SessionState",
]
