"""One app over the session's ``built_index``, shared by the server tests (it is read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="the server tests need the serve extra: pip install 'crossrank[serve]'"
)


@pytest.fixture(scope="session")
def app(built_index: Path):
    """``create_app`` over ``built_index`` on the CPU, raw ``where`` refused."""
    from crossrank.serve import create_app

    return create_app(built_index, device="cpu")


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c
