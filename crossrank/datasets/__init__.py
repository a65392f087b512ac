"""The synthetic compositional benchmark: shapes scenes with exact relevance.

``generate_shapes(DIR, n_images=..., n_queries=..., seed=..., split="test"|"train")`` writes images,
scene metadata, queries, TREC qrels and training pairs; :func:`parse_query`, :func:`satisfies` and
:func:`match_matrix` give the exact truth of any template text on any scene;
:func:`caption_perturbations` rewrites a caption into near misses (hard negative captions).
"""

from crossrank.datasets.config import (
    HELDOUT_PAIRS,
    PALETTE,
    Colour,
    QueryKind,
    Relation,
    Shape,
    ShapesConfig,
    Size,
    Split,
)
from crossrank.datasets.language import ObjectSpec, QuerySpec, parse_query, satisfies
from crossrank.datasets.negatives import (
    CaptionNegativeBank,
    caption_perturbations,
    perturbation_rows,
)
from crossrank.datasets.relevance import SceneArrays, SpecArrays, match_aligned, match_matrix
from crossrank.datasets.scene import Scene, SceneObject
from crossrank.datasets.shapes import (
    ShapesDataset,
    generate_from_config,
    generate_shapes,
    open_shapes,
)

__all__ = [
    "HELDOUT_PAIRS",
    "PALETTE",
    "CaptionNegativeBank",
    "Colour",
    "ObjectSpec",
    "QueryKind",
    "QuerySpec",
    "Relation",
    "Scene",
    "SceneArrays",
    "SceneObject",
    "Shape",
    "ShapesConfig",
    "ShapesDataset",
    "Size",
    "SpecArrays",
    "Split",
    "caption_perturbations",
    "generate_from_config",
    "generate_shapes",
    "match_aligned",
    "match_matrix",
    "open_shapes",
    "parse_query",
    "perturbation_rows",
    "satisfies",
]
