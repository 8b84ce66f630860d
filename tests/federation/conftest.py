"""Shared fixtures of the federation tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def quiet_flower():
    """Flower logs every round at INFO; the tests that run rounds keep only its warnings."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)
