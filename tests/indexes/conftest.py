"""Fixtures of the first-stage tests: one small clustered vector set, shared read-only."""

from __future__ import annotations

import pytest

from ._vectors import Vectors, make_vectors


@pytest.fixture(scope="session")
def vectors() -> Vectors:
    """2000 clustered vectors of dim 32 with shuffled ids 5, 8, 11, ... and 12 queries."""
    return make_vectors()
