"""crossrank over HTTP: a FastAPI app to run with ``crossrank serve`` or mount in a backend.

Needs fastapi and uvicorn, which crossrank installs; importing this package without fastapi (an
install that left them out) raises :class:`~crossrank.errors.DependencyError` saying so.

Example:
    >>> from crossrank.serve import create_app  # doctest: +SKIP
    >>> app = create_app("photos.idx")  # doctest: +SKIP
    >>> # then: uvicorn.run(app), or backend.mount("/photos", app)
"""

from crossrank.serve.app import create_app
from crossrank.serve.models import (
    CountsOut,
    EncoderOut,
    ErrorResponse,
    Health,
    HitOut,
    ScoresOut,
    SearchRequest,
    SearchResponse,
    ValidationErrorResponse,
)

__all__ = [
    "create_app",
    "SearchRequest",
    "SearchResponse",
    "HitOut",
    "ScoresOut",
    "CountsOut",
    "EncoderOut",
    "Health",
    "ErrorResponse",
    "ValidationErrorResponse",
]
