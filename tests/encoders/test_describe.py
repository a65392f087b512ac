"""describe_model: the demo encoder is named as such, with numbers true of the shipped model."""

from __future__ import annotations

import json

from crossrank.encoders import demo_model_dir
from crossrank.encoders.describe import DEMO_NOTE, describe_model


def test_the_demo_note_states_the_shipped_models_vocabulary_and_positions() -> None:
    config = json.loads((demo_model_dir() / "config.json").read_text())
    text = config.get("text_config", config)
    assert f"{text['vocab_size']} tokens" in DEMO_NOTE
    assert f"{text['max_position_embeddings']} text positions" in DEMO_NOTE


def test_the_demo_encoder_is_described_with_its_note_and_others_without() -> None:
    demo = describe_model({"model_id": "crossrank-demo", "model_type": "clip", "source": "demo"})
    assert demo.is_demo and demo.note == DEMO_NOTE
    assert demo.to_dict() == {
        "model_id": "crossrank-demo",
        "model_type": "clip",
        "demo": True,
        "note": DEMO_NOTE,
    }
    clip = describe_model({"model_id": "openai/clip-vit-base-patch32", "model_type": "clip"})
    assert not clip.is_demo and clip.note is None
