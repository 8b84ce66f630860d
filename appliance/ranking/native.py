"""The Rank path's per-candidate loops, the reasons' walk and the items' wire bytes in C (`_rankcore.c`), when
the build compiled them.

`make setup` (pip's build of setup.py) compiles the module next to this file; a box whose image had no
compiler gets no module, and the ranker then runs the same steps as numpy calls (ranker.py), which give the
same rankings (tests/ranking/test_native.py holds the two paths together). `APPLIANCE_RANK_NATIVE=0` turns
the C path off at start (comparisons, debugging)."""

from __future__ import annotations

import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

SEQ_USED, NEXT_USED = 1, 2  # score_and_pick's flags: the signal's reasons may name recent titles


def load() -> ModuleType | None:
    """The compiled module, or None (not built, or turned off by APPLIANCE_RANK_NATIVE=0)."""
    if os.environ.get("APPLIANCE_RANK_NATIVE", "1") == "0":
        return None
    try:
        from appliance.ranking import _rankcore
    except ImportError as e:
        log.warning("ranking: the C Rank loops are not built (%s); ranking with numpy, slower", e)
        return None
    return _rankcore
