"""Catalog parsing: MovieLens quirks, the maturity rule, and errors that name the line and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ValidationError
from appliance.ranking.catalog import (
    MATURITY_7,
    MATURITY_13,
    MATURITY_16,
    MATURITY_ALL,
    Catalog,
    CatalogRow,
    derive_maturity,
    parse_catalog_csv,
    write_catalog_csv,
)
from tests.conftest import shared_path


def _write(tmp_path: Path, text: str, crlf: bool = True) -> Path:
    p = tmp_path / "movies.csv"
    p.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode("utf-8"))
    return p


GOOD = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
11,"American President, The (1995)",Comedy|Drama|Romance
149532,Marco Polo: One Hundred Eyes (2015),(no genres listed)
171749,Death Note: Desu nôto (2006–2007),(no genres listed)
176601,Black Mirror,(no genres listed)
2,Jumanji (1995),Adventure|Children|Fantasy
"""


def test_parses_quoted_commas_years_and_no_genres(tmp_path: Path) -> None:
    rows = parse_catalog_csv(_write(tmp_path, GOOD))
    by_id = {r.item_id: r for r in rows}
    assert by_id[11].title == "American President, The (1995)"
    assert by_id[11].genres == ("Comedy", "Drama", "Romance")
    assert by_id[11].year == 1995
    assert by_id[149532].genres == () and by_id[149532].year == 2015
    assert by_id[171749].year == 2006           # a range keeps its first year
    assert by_id[176601].year is None
    assert by_id[1].maturity == MATURITY_ALL     # Children
    assert by_id[11].maturity == MATURITY_13     # plain drama/comedy
    assert by_id[149532].maturity == MATURITY_16  # unknown genres: conservative


def test_bad_line_names_line_and_field(tmp_path: Path) -> None:
    bad = GOOD.replace("2,Jumanji", "x2,Jumanji")
    with pytest.raises(ValidationError, match=r"line 7: field 'movieId'"):
        parse_catalog_csv(_write(tmp_path, bad))
    with pytest.raises(ValidationError, match=r"line 3: expected 3 fields"):
        parse_catalog_csv(_write(tmp_path, GOOD.replace('"American President, The (1995)"',
                                                        "American President, The (1995)")))
    with pytest.raises(ValidationError, match=r"line 4: field 'genres'"):
        parse_catalog_csv(_write(tmp_path, GOOD.replace("(no genres listed)\n171749", "\n171749")))
    with pytest.raises(ValidationError, match=r"line 7: field 'movieId': duplicate id 1"):
        parse_catalog_csv(_write(tmp_path, GOOD.replace("2,Jumanji", "1,Jumanji")))
    with pytest.raises(ValidationError, match=r"line 1: header lacks column 'genres'"):
        parse_catalog_csv(_write(tmp_path, "movieId,title\n1,A (1990)\n"))


def test_maturity_column_overrides_rule_and_is_validated(tmp_path: Path) -> None:
    text = "movieId,title,genres,maturity\n1,A (1990),Horror,all\n2,B (1991),Children,5\n3,C (1992),Drama,16\n"
    rows = parse_catalog_csv(_write(tmp_path, text, crlf=False))
    assert [r.maturity for r in rows] == [1, 5, 4]
    with pytest.raises(ValidationError, match=r"line 3: field 'maturity'"):
        parse_catalog_csv(_write(tmp_path, text.replace("Children,5", "Children,PG"), crlf=False))


def test_derive_maturity_rule() -> None:
    assert derive_maturity(("Animation", "Children", "Comedy")) == MATURITY_ALL
    assert derive_maturity(("Animation", "Sci-Fi")) == MATURITY_7
    assert derive_maturity(("Animation", "Horror")) == MATURITY_16
    assert derive_maturity(("Children", "Thriller")) == MATURITY_16
    assert derive_maturity(("Drama",)) == MATURITY_13
    assert derive_maturity(("Adventure", "Fantasy")) == MATURITY_7
    assert derive_maturity(()) == MATURITY_16
    assert derive_maturity(("Some New Genre",)) == MATURITY_16


def test_catalog_arrays_index_of_and_roundtrip(tmp_path: Path) -> None:
    rows = parse_catalog_csv(_write(tmp_path, GOOD))
    cat = Catalog.from_rows(rows)
    assert list(cat.ids) == sorted(r.item_id for r in rows)
    assert cat.genres.dtype == np.float32 and cat.maturity.dtype == np.int8
    r, known = cat.index_of(np.array([11, 999, 1, 176601, -5], dtype=np.int64))
    assert known.tolist() == [True, False, True, True, False]
    assert [cat.titles[i] for i in r[known]] == ["American President, The (1995)", "Toy Story (1995)",
                                                  "Black Mirror"]
    np.testing.assert_allclose(cat.genre_share.sum(axis=1)[cat.genres.sum(axis=1) > 0], 1.0)
    out = tmp_path / "round.csv"
    write_catalog_csv(cat.rows, out)
    assert parse_catalog_csv(out) == cat.rows


@pytest.mark.parametrize("ids", [[3, 7, 1000], [0, 3, 7, 1000], [3, 7, 10**12]])
def test_lookup_maps_any_id_like_index_of(ids: list[int]) -> None:
    """Dense table with clipping (ids > 0), dense table with id 0 (bounds checked), binary search (huge ids)."""
    cat = Catalog.from_rows([CatalogRow(item_id=i, title=f"t{i}", genres=("Drama",), year=None, maturity=1)
                             for i in ids])
    asked = np.array([7, -1, 0, 3, 1000, 1001, 10**12, 10**12 + 1, -(2**63), 2**63 - 1, 5], dtype=np.int64)
    got = cat.lookup(asked)
    want = [ids.index(int(i)) if int(i) in ids else -1 for i in asked]
    assert got.tolist() == want
    rows, known = cat.index_of(asked)
    assert known.tolist() == [w >= 0 for w in want] and rows.tolist() == [max(w, 0) for w in want]


def test_parses_the_whole_movielens_catalog() -> None:
    rows = parse_catalog_csv(shared_path("datasets", "movielens-small", "movies.csv"))
    assert len(rows) == 9742
    cat = Catalog.from_rows(rows)
    assert cat.genre_names[:19][-1] == "Western" and len(cat.genre_names) == 19
    assert (cat.year > 0).sum() == 9742 - 12  # 12 titles carry no year at all
