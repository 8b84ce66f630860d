"""Ranking: catalog, verified model bundle, in-process ranker with reasons (training lives in train.py)."""

from appliance.ranking.bundle import RankerBundle
from appliance.ranking.catalog import Catalog, CatalogRow, derive_maturity, parse_catalog_csv
from appliance.ranking.mood import mood_word
from appliance.ranking.ranker import RankContext, RankedItem, Ranker, RankResult, SignalWeights
from appliance.ranking.reasons import Reason

__all__ = [
    "Catalog", "CatalogRow", "RankContext", "RankResult", "RankedItem", "Ranker", "RankerBundle", "Reason",
    "SignalWeights", "derive_maturity", "mood_word", "parse_catalog_csv",
]
