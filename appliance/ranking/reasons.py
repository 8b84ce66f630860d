"""Turn an item's real signal contributions into reasons a household understands.

A reason is only written for a signal that actually pushed THIS item up (a positive contribution that
is at least `MIN_ABS` and at least `MIN_SHARE` of the item's strongest one), strongest first, at most
`MAX_REASONS`. Every item gets at least one reason: when nothing pushed it up (it was picked for
variety, or every candidate scored low), the reason says so plainly and names the item's strongest
signal.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.ranking.mood import CONTEXT_REASON_TEXT

SIGNALS = ("sequence", "next", "collaborative", "session", "content", "popularity", "context", "affect")
MIN_ABS = 0.02
MIN_SHARE = 0.2
MAX_REASONS = 3


@dataclass(frozen=True)
class Reason:
    text: str
    signal: str
    weight: float
    because_item_id: int = 0


@dataclass(frozen=True)
class ReasonInputs:
    """Per-item facts the texts need, computed vectorised by the ranker for the returned items only."""
    because_item_id: int = 0
    because_title: str = ""
    because_kind: str = "watched"
    recent_item_id: int = 0         # the recent title the sequence model's score leans on most
    recent_title: str = ""
    recent_kind: str = "watched"
    next_item_id: int = 0           # the recent title whose "watched next" transitions favour the item
    next_title: str = ""
    session_genre: str = ""
    profile_genre: str = ""
    pop_recent: bool = False
    context_key: str = ""
    mood: str = ""


def _text(signal: str, f: ReasonInputs) -> tuple[str, int] | None:
    if signal == "sequence":
        if not f.recent_item_id:
            return None
        return f"Because you just {f.recent_kind} {f.recent_title}", f.recent_item_id
    if signal == "next":
        if not f.next_item_id:
            return None
        return f"Viewers often watch this after {f.next_title}", f.next_item_id
    if signal == "collaborative":
        if not f.because_item_id:
            return None
        return f"Because you {f.because_kind} {f.because_title}", f.because_item_id
    if signal == "session":
        return (f"Fits what you're watching now: {f.session_genre}", 0) if f.session_genre else None
    if signal == "content":
        return (f"You like {f.profile_genre}", 0) if f.profile_genre else None
    if signal == "popularity":
        return ("Popular right now" if f.pop_recent else "Popular with viewers"), 0
    if signal == "context":
        text = CONTEXT_REASON_TEXT.get(f.context_key)
        return (text, 0) if text else None
    if signal == "affect":
        return (f"Matches the room's mood: {f.mood}", 0) if f.mood else None
    return None


def build_reasons(contributions: dict[str, float], facts: ReasonInputs) -> list[Reason]:
    """Reasons from the item's top positive contributions (never empty)."""
    ranked = sorted(contributions.items(), key=lambda kv: kv[1], reverse=True)
    top = ranked[0][1] if ranked else 0.0
    out: list[Reason] = []
    for signal, value in ranked:
        if value < MIN_ABS or value < MIN_SHARE * top or len(out) >= MAX_REASONS:
            break
        made = _text(signal, facts)
        if made is not None and not (made[1] and any(r.because_item_id == made[1] for r in out)):
            out.append(Reason(made[0], signal, float(value), made[1]))  # one reason per named title
    if not out:
        # Strongest positive signal even if small; if none is positive, say it is for variety.
        for signal, value in ranked:
            made = _text(signal, facts) if value > 0 else None
            if made is not None:
                return [Reason(made[0], signal, float(value), made[1])]
        signal, value = ranked[0] if ranked else ("popularity", 0.0)
        out.append(Reason("Something different to try", signal, float(value), 0))
    return out
