"""The HTTP API's request and response bodies, as pydantic models (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from crossrank.store.filters import OPS, check_filter_shape

__all__ = [
    "SearchRequest",
    "SearchResponse",
    "HitOut",
    "ScoresOut",
    "CountsOut",
    "EncoderOut",
    "Health",
    "ErrorResponse",
    "ValidationErrorResponse",
    "ValidationErrorItem",
    "MAX_K",
    "MAX_RERANK_K",
]

MAX_K = 1000  # hits one request may ask for
MAX_RERANK_K = 10_000  # candidates one request may have reranked
MAX_IN_VALUES = 1000  # values in one `in` list
MAX_FILTER_COLUMNS = 64  # columns one filter may name

_SCALAR: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
    ]
}
_OPS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{op: _SCALAR for op in ("eq", "ne", "lt", "le", "gt", "ge")},
        "in": {"type": "array", "items": _SCALAR, "maxItems": MAX_IN_VALUES},
        "contains": {"type": "string"},
    },
    "additionalProperties": False,
    "minProperties": 1,
}
#: The JSON schema of ``filters``: ``{column: value | {op: value}}``. Written out by hand because
#: the values are validated by :func:`crossrank.store.filters.check_filter_shape`, whose one-line
#: messages are clearer than a union's list of failed alternatives.
FILTERS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "additionalProperties": {"anyOf": [*_SCALAR["anyOf"], _OPS_SCHEMA]},
            "maxProperties": MAX_FILTER_COLUMNS,
        },
        {"type": "null"},
    ],
    "title": "Filters",
    "description": (
        "Structured metadata filter, all conditions must hold: {column: value | {op: value}}, "
        f'ops {OPS}; a bare value means eq; {{"eq": null}} / {{"ne": null}} test for a missing '
        "value; contains is a case-sensitive substring of a string column; timestamps and dates "
        "are ISO-8601 strings. Columns and value types are checked against the index's metadata "
        "(GET /healthz lists them); a mismatch is a 422."
    ),
    "examples": [
        {"width": {"ge": 256}, "path": {"contains": "/2024/"}, "label": {"in": ["cat", "dog"]}}
    ],
}


class SearchRequest(BaseModel):
    """``POST /search``: a text query, how many hits, and an optional filter."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "a red circle left of a blue square",
                    "k": 10,
                    "rerank_k": 100,
                    "filters": {"width": {"ge": 32}},
                }
            ],
        },
    )

    query: str = Field(min_length=1, max_length=1000, description="The text to search for.")
    k: int = Field(default=10, ge=1, le=MAX_K, description="Hits to return.")
    rerank_k: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RERANK_K,
        description=(
            "First-stage candidates the reranker rescores (>= k); "
            "default max(k, the server's rerank_k)."
        ),
    )
    filters: Annotated[dict[str, Any] | None, WithJsonSchema(FILTERS_SCHEMA)] = None
    where: str | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        description="A raw DuckDB SQL predicate over the metadata (trusted clients only): refused "
        "with 403 unless the server was started with --allow-where.",
    )
    explain: bool = Field(
        default=False,
        description="Also return, per hit, where each query word looked: the query's tokens, "
        "the patch grid [rows, cols] and one map per token over the patches (hits[].explain); "
        "a note says why when the reranker cannot.",
    )

    @field_validator("filters")
    @classmethod
    def _filters_have_a_valid_shape(cls, filters: dict[str, Any] | None) -> dict[str, Any] | None:
        if filters is not None:
            if len(filters) > MAX_FILTER_COLUMNS:
                raise ValueError(
                    f"filters name {len(filters)} columns; at most {MAX_FILTER_COLUMNS}"
                )
            check_filter_shape(filters)
            for column, spec in filters.items():
                values = spec.get("in") if isinstance(spec, dict) else None
                if isinstance(values, list) and len(values) > MAX_IN_VALUES:
                    raise ValueError(
                        f'filter "{column}" in: {len(values)} values; at most {MAX_IN_VALUES}'
                    )
        return filters

    @model_validator(mode="after")
    def _rerank_k_covers_k(self) -> SearchRequest:
        if self.rerank_k is not None and self.rerank_k < self.k:
            raise ValueError(
                f"rerank_k must be >= k (the reranker can only return candidates it saw), got "
                f"rerank_k={self.rerank_k} and k={self.k}"
            )
        return self


class ScoresOut(BaseModel):
    """The score of each stage (null where a stage did not run or the score is not finite)."""

    first_stage: float | None
    rerank: float | None


class ExplainOut(BaseModel):
    """Where each query word looked in one hit (asked with ``explain: true``)."""

    tokens: list[str] = Field(description="The query's tokens, special tokens left out.")
    grid: list[int] = Field(description="[rows, cols] of the patch grid, read from the top left.")
    maps: list[list[float]] = Field(
        description="Per token, rows * cols weights over the patches (cross-attention: the last "
        "layer's weights, heads averaged, summing to 1; MaxSim: 1 at the best patch)."
    )


class HitOut(BaseModel):
    """One image found; fetch it with ``GET /images/{id}``."""

    id: int
    path: str
    score: float | None
    scores: ScoresOut
    metadata: dict[str, Any]
    explain: ExplainOut | None = None


class CountsOut(BaseModel):
    """Why a result list has the length it has."""

    requested: int
    returned: int
    filtered_out: int
    candidates: int


class EncoderOut(BaseModel):
    """The model that encoded the index and encodes the queries."""

    model_id: str = Field(description="The Hugging Face id or folder the index was built with.")
    model_type: str = Field(description="clip or blip (empty when the index does not say).")
    demo: bool = Field(description="The demo encoder shipped with crossrank (synthetic shapes).")
    note: str | None = Field(
        None, description="For the demo encoder, one line on what it is and how to use a real one."
    )


class SearchResponse(BaseModel):
    """The hits of one query, best first: the same JSON as ``crossrank search --json``."""

    query: str
    hits: list[HitOut]
    counts: CountsOut
    timings_ms: dict[str, float]
    generation: int | None = Field(
        None,
        description="The index generation every stage of this search read (a living index "
        "moves to newer ones as writers commit).",
    )
    encoder: EncoderOut | None = None
    reranker: str | None = Field(
        None, description="What ranked the first stage's candidates (none: the first stage alone)."
    )
    fusion: str | None = Field(None, description="How the final score combines the two stages.")
    notes: list[str] = Field(
        default_factory=list, description="One-line remarks about this search (e.g. a cut query)."
    )


class Health(BaseModel):
    """``GET /healthz``: the index is open; its size, model and filterable columns."""

    status: Literal["ok"] = "ok"
    images: int
    generation: int
    model: str
    encoder: EncoderOut
    columns: dict[str, str] = Field(
        description="Metadata column -> Arrow type, what filters can name."
    )


class ErrorResponse(BaseModel):
    """A refused request: one line saying why and what to do."""

    detail: str


class ValidationErrorItem(BaseModel):
    """One problem with a request: where it is and what is wrong."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """A 422: the request's body or parameters cannot be used; ``detail`` is one line."""

    detail: str
    errors: list[ValidationErrorItem] = Field(default_factory=list)
