"""Turn an item's real signal contributions into reasons a household understands.

A reason is only written for a signal that actually pushed THIS item up (a positive contribution that
is at least `MIN_ABS` and at least `MIN_SHARE` of the item's strongest one), strongest first, at most
`MAX_REASONS`. Every item gets at least one reason: when nothing pushed it up (it was picked for
variety, or every candidate scored low), the reason says so plainly and names the item's strongest
signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.ranking.mood import CONTEXT_REASON_TEXT

SIGNALS = ("sequence", "next", "collaborative", "session", "content", "popularity", "context", "affect")
MIN_ABS = 0.02
MIN_SHARE = 0.2
MAX_REASONS = 3


@dataclass(slots=True)
class Reason:
    text: str
    signal: str
    weight: float
    because_item_id: int = 0


# The per-item facts the texts need (a plain dict, filled by the ranker vectorised for the returned items
# only; a missing key means the fact is unknown): because_item_id / because_title / because_kind ("liked" or
# "watched"); recent_item_id / recent_title / recent_kind (the recent title the sequence score leans on
# most); next_item_id / next_title (the recent title whose "watched next" chain favours the item);
# session_genre; profile_genre; pop_recent (bool); context_key; mood.
Facts = dict


def _sequence(f: Facts) -> tuple[str, int] | None:
    rid = f.get("recent_item_id", 0)
    return (f"Because you just {f.get('recent_kind', 'watched')} {f['recent_title']}", rid) if rid else None


def _next(f: Facts) -> tuple[str, int] | None:
    nid = f.get("next_item_id", 0)
    return (f"Viewers often watch this after {f['next_title']}", nid) if nid else None


def _collaborative(f: Facts) -> tuple[str, int] | None:
    bid = f.get("because_item_id", 0)
    return (f"Because you {f.get('because_kind', 'watched')} {f['because_title']}", bid) if bid else None


def _session(f: Facts) -> tuple[str, int] | None:
    g = f.get("session_genre")
    return (f"Fits what you're watching now: {g}", 0) if g else None


def _content(f: Facts) -> tuple[str, int] | None:
    g = f.get("profile_genre")
    return (f"You like {g}", 0) if g else None


def _popularity(f: Facts) -> tuple[str, int] | None:
    return ("Popular right now" if f.get("pop_recent") else "Popular with viewers"), 0


def _context(f: Facts) -> tuple[str, int] | None:
    text = CONTEXT_REASON_TEXT.get(f.get("context_key", ""))
    return (text, 0) if text else None


def _affect(f: Facts) -> tuple[str, int] | None:
    m = f.get("mood")
    return (f"Matches the room's mood: {m}", 0) if m else None


_TEXTS = {"sequence": _sequence, "next": _next, "collaborative": _collaborative, "session": _session,
          "content": _content, "popularity": _popularity, "context": _context, "affect": _affect}
_TEXT = tuple(_TEXTS[s] for s in SIGNALS)  # by signal index: (text, named title id) or None when unknown




def build_reasons(values: Sequence[float], facts: Facts, order: Sequence[int] | None = None) -> list[Reason]:
    """Reasons from the item's top positive contributions (`values` in SIGNALS order; never empty).
    `order`: the signals by value, descending, ties in SIGNALS order (the ranker passes it, computed for
    all returned items at once)."""
    if order is None:
        order = sorted(range(len(SIGNALS)), key=values.__getitem__, reverse=True)  # stable, like argsort
    return strong_reasons(values, facts, order) or fallback_reason(values, facts, order)


def strong_reasons(values: Sequence[float], facts: Facts, order: Sequence[int]) -> list[Reason]:
    """The reasons of the signals that pushed the item up enough (possibly none). Reads the facts of
    those signals only: the ones whose value is not below `reason_floor(max(values))`."""
    return [Reason(*r) for r in strong_reason_tuples(values, facts, order)]


def fallback_reason(values: Sequence[float], facts: Facts, order: Sequence[int]) -> list[Reason]:
    """When no signal made a reason: the strongest positive signal even if small; if none is positive, say
    it is for variety. Reads the facts of any positive signal."""
    return [Reason(*fallback_reason_tuple(values, facts, order))]


ReasonTuple = tuple  # (text, signal, weight, because_item_id): a Reason's fields, in its field order


def strong_reason_tuples(values: Sequence[float], facts: Facts, order: Sequence[int]) -> list[ReasonTuple]:
    """`strong_reasons` as field tuples."""
    return strong_from_made(values, order, _Made(facts))


def fallback_reason_tuple(values: Sequence[float], facts: Facts, order: Sequence[int]) -> ReasonTuple:
    """`fallback_reason`'s one reason as a field tuple."""
    return fallback_from_made(values, order, _Made(facts))


class _Made:
    """made[j]: what signal j's text function makes of these facts, (text, named title id) or None."""

    __slots__ = ("facts",)

    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def __getitem__(self, j: int) -> tuple[str, int] | None:
        return _TEXT[j](self.facts)


def made_of(j: int, facts: Facts) -> tuple[str, int] | None:
    """Signal j's (text, named title id) from an item's facts, or None when they do not make one."""
    return _TEXT[j](facts)


def strong_from_made(values: Sequence[float], order: Sequence[int], made) -> list[ReasonTuple]:  # noqa: ANN001
    """The strong reasons as Reason field tuples, from `made[j]` = made_of(j, the item's facts) (read only
    for the signals not below the item's floor). The one implementation behind `strong_reasons`."""
    top = values[order[0]]
    floor = MIN_SHARE * top if MIN_SHARE * top > MIN_ABS else MIN_ABS  # reason_floor(top), inlined
    out: list[ReasonTuple] = []
    named: list[int] = []  # titles already named by a reason
    for j in order:
        value = values[j]
        if value < floor:
            break
        m = made[j]
        if m is not None:
            if m[1]:
                if m[1] in named:
                    continue  # one reason per named title
                named.append(m[1])
            out.append((m[0], SIGNALS[j], value, m[1]))
            if len(out) == MAX_REASONS:
                break
    return out


def fallback_from_made(values: Sequence[float], order: Sequence[int], made) -> ReasonTuple:  # noqa: ANN001
    """`fallback_reason`'s reason as a field tuple, from `made[j]` (read only for positive signals)."""
    for j in order:
        m = made[j] if values[j] > 0 else None
        if m is not None:
            return (m[0], SIGNALS[j], float(values[j]), m[1])
    return ("Something different to try", SIGNALS[order[0]], float(values[order[0]]), 0)


def reason_floor(top: float) -> float:
    """The least value of a signal that may make a reason, for an item whose strongest value is `top`."""
    return max(MIN_ABS, MIN_SHARE * top)
