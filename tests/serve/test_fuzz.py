"""The API under schemathesis: every generated request, valid or not, gets a documented 2xx/4xx.

Bounded (a few dozen requests per operation and mode, derandomized) so that it stays a default
test. The operations are driven with plain Hypothesis ``@given`` over schemathesis' strategies
rather than ``@schema.parametrize()``, whose lazy fixture loading does not run under pytest 9.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    "POST /search",
    "GET /images/{image_id}",
    "GET /thumbnails/{image_id}",
    "GET /healthz",
    "GET /",
]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 30}
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

# GET /healthz takes no input, so there is nothing negative to send it.
CASES = [
    (label, mode)
    for label in OPERATIONS
    for mode in EXAMPLES
    if not (label == "GET /healthz" and mode is GenerationMode.NEGATIVE)
]


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def trusted_schema(app):
    """The same index behind an app that runs raw `where` (sandboxed)."""
    from crossrank.serve import create_app

    return schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(app.state.index, allow_where=True)
    )


def _fuzz(operation, mode: GenerationMode, n: int) -> None:
    @settings(FUZZ, max_examples=n)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


def test_the_fuzzed_operations_are_all_the_operations(api_schema) -> None:
    found = sorted(
        f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()
    )
    assert found == sorted(OPERATIONS)


@pytest.mark.parametrize(
    ("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES]
)
def test_no_request_gets_a_server_error_or_an_undocumented_answer(
    api_schema, label: str, mode
) -> None:
    method, path = label.split(" ")
    _fuzz(api_schema[path][method], mode, EXAMPLES[mode])


def test_no_raw_where_gets_a_server_error_on_a_trusted_server(trusted_schema) -> None:
    _fuzz(
        trusted_schema["/search"]["POST"],
        GenerationMode.POSITIVE,
        EXAMPLES[GenerationMode.POSITIVE],
    )


# Schemathesis rarely guesses a real column name; this aims filters at the index's own columns.
_TEXT = st.text(max_size=12) | st.sampled_from(
    [
        "x' OR '1'='1",
        "'; DROP VIEW metadata; --",
        "read_csv('/etc/passwd')",
        "'); COPY metadata TO '/tmp/crossrank-fuzz.csv'; --",
        "%",
        "img_",
        "\x00",
        "",
    ]
)
_VALUE = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
_OPS = st.dictionaries(
    st.sampled_from(["eq", "ne", "lt", "le", "gt", "ge", "contains", "in", "like"]),
    _VALUE | st.lists(_VALUE, max_size=3),
    min_size=1,
    max_size=3,
)


def test_filters_on_real_columns_get_a_200_or_a_one_line_422(app, client) -> None:
    columns = list(app.state.index.metadata_store.columns)

    @settings(FUZZ, max_examples=60)
    @given(filters=st.dictionaries(st.sampled_from(columns), _VALUE | _OPS, max_size=3))
    def check(filters) -> None:
        body = json.dumps(
            {"query": "a red circle", "k": 3, "rerank_k": 5, "filters": filters}, allow_nan=False
        )
        response = client.post(
            "/search", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code in (200, 422), response.text
        if response.status_code == 422:
            detail = response.json()["detail"]
            assert detail and "\n" not in detail

    check()
    assert not Path("/tmp/crossrank-fuzz.csv").exists()
