from __future__ import annotations

import pytest

from crossrank.ingest import DEFAULT_MAX_PIXELS, IngestConfig


def test_defaults_follow_pillows_limit():
    config = IngestConfig()
    assert config.max_pixels == DEFAULT_MAX_PIXELS == 89_478_485
    assert config.workers == 4


def test_workers_zero_is_allowed():
    assert IngestConfig(workers=0).workers == 0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("workers", -1, r"IngestConfig\.workers must be >= 0, got -1"),
        ("max_pixels", 0, r"IngestConfig\.max_pixels must be >= 1, got 0"),
        ("chunk_size", 0, r"IngestConfig\.chunk_size must be >= 1, got 0"),
        ("prefetch_batches", 0, r"IngestConfig\.prefetch_batches must be >= 1, got 0"),
        ("workers", 2.0, r"IngestConfig\.workers must be an int, got float"),
        ("max_pixels", True, r"IngestConfig\.max_pixels must be an int, got bool"),
    ],
)
def test_invalid_config_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        IngestConfig(**{field: value})
