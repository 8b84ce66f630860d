"""Room mood -> genre affinity, and the small time/device prior: two documented, configurable tables.

Self-contained on purpose (no import from appliance.vision): ranking must keep working, and keep its
meaning, when the vision process is absent or crashed.

Mood is read from the group's valence/arousal (both -1..1, circumplex model). Within `NEUTRAL_RADIUS`
of the origin the room is "neutral" and affect has no effect. Otherwise the quadrant names the mood:

    arousal >= 0, valence >= 0  -> "upbeat"   match it: comedy, adventure, action, musicals
    arousal <  0, valence >= 0  -> "calm"     keep it: romance, gentle comedy, documentaries; no horror
    arousal >= 0, valence <  0  -> "tense"    lighten it (mood repair): comedy, animation; no horror/thrillers
    arousal <  0, valence <  0  -> "subdued"  comfort it: comedy, animation, musicals, romance; no war

A table entry is a genre -> weight in [-1, 1]; an item's affinity is the mean over its genres. The affect
term's strength also grows with how far from neutral the room is (full at `FULL_RADIUS`) and with the
room's engagement (half strength when nobody looks at the screen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

NEUTRAL_RADIUS = 0.15
FULL_RADIUS = 0.5

MoodTable = Mapping[str, Mapping[str, float]]

MOOD_GENRE_TABLE: dict[str, dict[str, float]] = {
    "upbeat": {"Comedy": 1.0, "Adventure": 0.7, "Action": 0.6, "Musical": 0.6, "Animation": 0.5,
               "Fantasy": 0.4, "Drama": -0.3, "Documentary": -0.3, "Horror": -0.3, "War": -0.6},
    "calm": {"Romance": 0.8, "Documentary": 0.6, "Comedy": 0.5, "Animation": 0.5, "Drama": 0.4,
             "Fantasy": 0.3, "Action": -0.3, "Thriller": -0.6, "War": -0.6, "Horror": -1.0},
    "tense": {"Comedy": 0.8, "Animation": 0.6, "Children": 0.4, "Musical": 0.4, "Romance": 0.3,
              "Crime": -0.5, "War": -0.7, "Thriller": -0.8, "Horror": -1.0},
    "subdued": {"Comedy": 0.9, "Animation": 0.6, "Musical": 0.6, "Romance": 0.5, "Children": 0.4,
                "Adventure": 0.3, "Drama": -0.3, "Film-Noir": -0.4, "Horror": -0.7, "War": -0.8},
    "neutral": {},
}

# Context prior: we do not know runtimes, so "short and light" is approximated from genres. Small on
# purpose (it nudges, it never decides). Keys and when they are active: see `active_context_keys`.
CONTEXT_GENRE_TABLE: dict[str, dict[str, float]] = {
    "late_night": {"Comedy": 0.6, "Animation": 0.4, "Romance": 0.3, "Drama": -0.2, "Documentary": -0.2,
                   "IMAX": -0.5, "War": -0.6},
    "mobile": {"Comedy": 0.5, "Animation": 0.4, "Documentary": 0.3, "Sci-Fi": -0.2, "War": -0.4,
               "IMAX": -0.8},
    "weekend_daytime": {"Children": 0.5, "Animation": 0.5, "Adventure": 0.4, "Fantasy": 0.3,
                        "Horror": -0.4},
}

CONTEXT_REASON_TEXT = {
    "late_night": "Good for late-night viewing",
    "mobile": "Easy to watch on a phone",
    "weekend_daytime": "Good for a weekend afternoon",
}

DEVICE_MOBILE = 2  # proto DeviceType.DEVICE_TYPE_MOBILE


def mood_word(valence: float, arousal: float) -> str:
    """One word for the room's mood (see the module docstring for the quadrants)."""
    if not (math.isfinite(valence) and math.isfinite(arousal)):
        return "neutral"
    if math.hypot(valence, arousal) < NEUTRAL_RADIUS:
        return "neutral"
    if valence >= 0:
        return "upbeat" if arousal >= 0 else "calm"
    return "tense" if arousal >= 0 else "subdued"


def mood_intensity(valence: float, arousal: float, engagement: float) -> float:
    """0..1: distance from neutral (full at FULL_RADIUS) times 0.5..1 for engagement."""
    if not (math.isfinite(valence) and math.isfinite(arousal) and math.isfinite(engagement)):
        return 0.0
    r = math.hypot(valence, arousal)
    if r < NEUTRAL_RADIUS:
        return 0.0
    strength = min(1.0, r / FULL_RADIUS)
    return strength * (0.5 + 0.5 * min(1.0, max(0.0, engagement)))


def active_context_keys(device: int, local_hour: int, weekday: int) -> list[str]:
    """Which context-prior rows apply: late night is 22:00-04:59; weekend daytime is Sat/Sun 09-17
    (weekday 0 = Monday, as datetime.weekday()); mobile is the phone device type."""
    keys = []
    if local_hour >= 22 or 0 <= local_hour < 5:  # -1 = time unknown
        keys.append("late_night")
    if device == DEVICE_MOBILE:
        keys.append("mobile")
    if weekday in (5, 6) and 9 <= local_hour < 18:
        keys.append("weekend_daytime")
    return keys
