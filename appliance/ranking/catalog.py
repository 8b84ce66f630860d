"""The title catalog the box ranks over: parsed once, held as numpy arrays for vectorised scoring.

The CSV format is MovieLens' `movieId,title,genres` (quoted titles may hold commas, the release year
sits in "(1995)" at the end of the title, genres are pipe-separated, "(no genres listed)" means none),
with an optional `maturity` column. MovieLens carries no age ratings, so when the column is absent
`derive_maturity` applies a documented, deliberately conservative rule from the genres.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.errors import ValidationError

# Proto `Maturity` values (common.proto): a title is allowed when its level <= the request's ceiling.
MATURITY_ALL, MATURITY_7, MATURITY_13, MATURITY_16, MATURITY_ADULT = 1, 2, 3, 4, 5
MATURITY_NAMES = {"all": 1, "7": 2, "13": 3, "16": 4, "adult": 5}
MATURITY_LABELS = {v: k for k, v in MATURITY_NAMES.items()}

# MovieLens' genre vocabulary, in a fixed order so genre vectors mean the same thing in the bundle, the
# fusion state and the ranker. A catalog may add genres of its own: they are appended, sorted.
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"

_YEAR_RE = re.compile(r"\((\d{4})(?:[-\u2013]\d{4})?\)\s*$")

# derive_maturity's rule, most restrictive first. Genres that routinely carry violence or fear put a
# title at 16; a Children title otherwise is ALL; Animation otherwise is 7; everything else takes the
# highest of its genres' levels below. Unknown genres (or none listed) are 16: we do not know, so we do
# not show it to young viewers. Nothing is derived as ADULT: MovieLens has no explicit-content genre;
# ADULT only comes from a `maturity` column.
_LEVEL_16 = frozenset({"Horror", "Thriller", "Crime", "War"})
_GENRE_LEVEL = {
    "Adventure": MATURITY_7, "Fantasy": MATURITY_7, "Musical": MATURITY_7, "IMAX": MATURITY_7,
    "Comedy": MATURITY_13, "Drama": MATURITY_13, "Romance": MATURITY_13, "Action": MATURITY_13,
    "Sci-Fi": MATURITY_13, "Mystery": MATURITY_13, "Film-Noir": MATURITY_13, "Western": MATURITY_13,
    "Documentary": MATURITY_13,
}


def derive_maturity(genres: Sequence[str]) -> int:
    """Conservative age level from genres alone (used only when the catalog has no maturity column)."""
    gs = set(genres)
    if not gs or gs & _LEVEL_16:
        return MATURITY_16
    if "Children" in gs:
        return MATURITY_ALL
    if "Animation" in gs:
        return MATURITY_7
    return max(_GENRE_LEVEL.get(g, MATURITY_16) for g in gs)


def parse_maturity(text: str) -> int:
    """'1'..'5' or all/7/13/16/adult (case-insensitive) -> proto Maturity int; ValueError otherwise."""
    t = text.strip().lower()
    if t in MATURITY_NAMES:
        return MATURITY_NAMES[t]
    if t.isdigit() and 1 <= int(t) <= 5:
        return int(t)
    raise ValueError(f"maturity must be 1..5 or one of {sorted(MATURITY_NAMES)}, got {text!r}")


@dataclass(frozen=True)
class CatalogRow:
    item_id: int
    title: str
    genres: tuple[str, ...]
    year: int | None
    maturity: int


def _year_of(title: str) -> int | None:
    m = _YEAR_RE.search(title)
    return int(m.group(1)) if m else None


def parse_catalog_csv(path: str | os.PathLike[str]) -> list[CatalogRow]:
    """Read a MovieLens-format catalog; a bad row raises ValidationError naming the line and field."""
    p = Path(path)
    try:
        fh = p.open("r", encoding="utf-8", newline="")
    except OSError as exc:
        raise ValidationError(f"{p}: cannot read catalog: {exc.strerror}") from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lstrip("\ufeff") for h in next(reader)]
        except StopIteration:
            raise ValidationError(f"{p}: line 1: empty catalog (no header)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValidationError(f"{p}: line 1: unreadable header: {exc}") from None
        for need in ("movieId", "title", "genres"):
            if need not in header:
                raise ValidationError(f"{p}: line 1: header lacks column {need!r} (has {header})")
        i_id, i_title, i_genres = header.index("movieId"), header.index("title"), header.index("genres")
        i_mat = header.index("maturity") if "maturity" in header else None
        rows: list[CatalogRow] = []
        seen: dict[int, int] = {}
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ValidationError(f"{p}: line {reader.line_num}: malformed CSV: {exc}") from None
            line = reader.line_num
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) != len(header):
                raise ValidationError(f"{p}: line {line}: expected {len(header)} fields, got {len(rec)}")
            try:
                item_id = int(rec[i_id])
            except ValueError:
                raise ValidationError(f"{p}: line {line}: field 'movieId': not an integer: {rec[i_id]!r}") from None
            if item_id <= 0 or item_id >= 2**62:
                raise ValidationError(f"{p}: line {line}: field 'movieId': out of range: {item_id}")
            if item_id in seen:
                raise ValidationError(f"{p}: line {line}: field 'movieId': duplicate id {item_id} "
                                      f"(first on line {seen[item_id]})")
            seen[item_id] = line
            title = rec[i_title].strip()
            if not title:
                raise ValidationError(f"{p}: line {line}: field 'title': empty")
            raw_genres = rec[i_genres].strip()
            if not raw_genres:
                raise ValidationError(f"{p}: line {line}: field 'genres': empty (use {NO_GENRES!r})")
            genres = () if raw_genres == NO_GENRES else tuple(g.strip() for g in raw_genres.split("|"))
            if any(not g for g in genres):
                raise ValidationError(f"{p}: line {line}: field 'genres': empty genre in {raw_genres!r}")
            if i_mat is not None:
                try:
                    maturity = parse_maturity(rec[i_mat])
                except ValueError as exc:
                    raise ValidationError(f"{p}: line {line}: field 'maturity': {exc}") from None
            else:
                maturity = derive_maturity(genres)
            rows.append(CatalogRow(item_id, title, genres, _year_of(title), maturity))
    if not rows:
        raise ValidationError(f"{p}: catalog has no rows")
    return rows


def write_catalog_csv(rows: Iterable[CatalogRow], path: str | os.PathLike[str]) -> None:
    """Write rows in the same format (with the maturity column), so parse_catalog_csv reads them back."""
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["movieId", "title", "genres", "maturity"])
        for r in rows:
            w.writerow([r.item_id, r.title, "|".join(r.genres) if r.genres else NO_GENRES, r.maturity])


LUT_MAX_BYTES = 16 << 20  # a dense id -> row table up to this size (ids up to ~4M); else binary search


class Catalog:
    """Column arrays over the catalog, sorted by id. `index_of` maps ids to rows with one gather from a
    dense id -> row table when the ids are small enough for one (the Rank and ingest paths), else with
    np.searchsorted."""

    def __init__(self, rows: Sequence[CatalogRow]) -> None:
        order = sorted(range(len(rows)), key=lambda i: rows[i].item_id)
        self.rows: list[CatalogRow] = [rows[i] for i in order]
        self.ids = np.fromiter((r.item_id for r in self.rows), dtype=np.int64, count=len(self.rows))
        if len(self.ids) and np.any(np.diff(self.ids) == 0):
            raise ValidationError("catalog: duplicate item ids")
        extra = sorted({g for r in self.rows for g in r.genres} - set(GENRES))
        self.genre_names: tuple[str, ...] = GENRES + tuple(extra)
        gidx = {g: j for j, g in enumerate(self.genre_names)}
        self.genres = np.zeros((len(self.rows), len(self.genre_names)), dtype=np.float32)
        for i, r in enumerate(self.rows):
            for g in r.genres:
                self.genres[i, gidx[g]] = 1.0
        # Each genre's share of the title (rows sum to 1, or 0 for no genres): the per-event update.
        self.genre_share = self.genres / np.maximum(self.genres.sum(axis=1, keepdims=True), 1.0)
        self.titles: list[str] = [r.title for r in self.rows]
        self.year = np.array([r.year or 0 for r in self.rows], dtype=np.int32)  # 0 = unknown
        self.maturity = np.array([r.maturity for r in self.rows], dtype=np.int8)
        self._row: dict[int, int] = {int(i): k for k, i in enumerate(self.ids)}
        self.genre_index = gidx
        # Dense id -> row table (-1: not a title). When every id is positive, entry 0 and one entry past the
        # largest id are -1 too, so `take(ids, mode="clip")` maps any id (negative, huge) in one gather.
        self._lut: np.ndarray | None = None
        self._lut_clips = False
        if len(self.ids) and int(self.ids[0]) >= 0 and int(self.ids[-1]) * 4 <= LUT_MAX_BYTES:
            self._lut = np.full(int(self.ids[-1]) + 2, -1, dtype=np.int32)
            self._lut[self.ids] = np.arange(len(self.ids), dtype=np.int32)
            self._lut_clips = int(self.ids[0]) > 0
        # The same map as a rank bitmap (the C Rank path's): bit `id` set for a title, and per word of 64 ids
        # the number of titles before it, so row = base[id // 64] + the set bits below id in its word (rows
        # are in id order). 36 KB for MovieLens's ids where the dense table is 775 KB: it stays in cache,
        # and a Rank's 1,000 lookups no longer wait on memory.
        self._id_bits: tuple[np.ndarray, np.ndarray] | None = None
        if self._lut is not None:
            words = int(self.ids[-1]) // 64 + 1
            bits = np.zeros(words, dtype=np.uint64)
            np.bitwise_or.at(bits, self.ids // 64, np.left_shift(np.uint64(1), (self.ids % 64).astype(np.uint64)))
            per_word = np.bincount(self.ids // 64, minlength=words)
            self._id_bits = (bits, np.concatenate([[0], np.cumsum(per_word)[:-1]]).astype(np.int32))

    @classmethod
    def from_rows(cls, rows: Sequence[CatalogRow]) -> Catalog:
        return cls(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def index_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `ids` and a mask of which ids are in the catalog (rows of unknown ids are 0)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(self.ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        if self._lut is not None:
            rows = self.lookup(ids).astype(np.int64)
            known = rows >= 0
            if not known.all():
                rows[~known] = 0
            return rows, known
        pos = np.searchsorted(self.ids, ids)
        pos_c = np.minimum(pos, len(self.ids) - 1)
        known = self.ids[pos_c] == ids
        return np.where(known, pos_c, 0).astype(np.int64), known

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of int64 `ids`, -1 where an id is not a title (the Rank path: one gather from the dense table
        when there is one; the rows' dtype is int32 or int64)."""
        lut = self._lut
        if lut is not None:
            if self._lut_clips:
                return lut.take(ids, mode="clip")
            inside = (ids >= 0) & (ids < len(lut))
            return lut[ids] if inside.all() else np.where(inside, lut[np.where(inside, ids, 0)], -1)
        if len(self.ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)

    @property
    def id_bits(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(bits uint64, base int32): the id -> row map as a rank bitmap (see __init__), None without a
        dense table."""
        return self._id_bits

    def row_of(self, item_id: int) -> int | None:
        """Row of one id (dict lookup: the per-event path), None when unknown."""
        return self._row.get(int(item_id))

    def title_of(self, item_id: int) -> str:
        r = self._row.get(int(item_id))
        return self.titles[r] if r is not None else str(item_id)
