"""The Rank path's per-candidate loops, the reasons' walk and the items' wire bytes in C (`_rankcore.c`), and
the sequence encoder's query (`_seqcore.c`), when the build compiled them.

`make setup` (pip's build of setup.py) compiles the module next to this file; a box whose image had no
compiler gets no module, and the ranker then runs the same steps as numpy calls (ranker.py), which give the
same rankings (tests/ranking/test_native.py holds the two paths together; test_sequence_numpy.py the
encoder's). `APPLIANCE_RANK_NATIVE=0` turns both C paths off at start (comparisons, debugging)."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

SEQ_USED, NEXT_USED = 1, 2  # score_and_pick's flags: the signal's reasons may name recent titles


def load(module: str = "_rankcore") -> ModuleType | None:
    """The compiled module (`_rankcore` or `_seqcore`), or None (not built, or turned off by
    APPLIANCE_RANK_NATIVE=0)."""
    if os.environ.get("APPLIANCE_RANK_NATIVE", "1") == "0":
        return None
    try:
        return importlib.import_module(f"appliance.ranking.{module}")
    except ImportError as e:
        what = "the C Rank loops are" if module == "_rankcore" else "the C sequence encoder is"
        log.warning("ranking: %s not built (%s); running them as numpy, slower", what, e)
        return None
