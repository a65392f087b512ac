"""Attention supervision targets: object words' token positions, object cells as patch masks."""

import numpy as np
import pytest
import torch

from crossrank.datasets import SceneArrays, SpecArrays, parse_query
from crossrank.datasets.config import Colour, Shape, Size
from crossrank.datasets.scene import Scene, SceneObject
from crossrank.errors import InvalidArgumentError
from crossrank.training.attention_targets import (
    attention_supervision_loss,
    cell_patches,
    object_cell_masks,
    object_token_positions,
)


def test_object_words_are_found_by_the_tokenizers_offsets(tiny_clip):
    from crossrank.encoders import load_encoder

    encoder = load_encoder(str(tiny_clip), device="cpu")
    texts = [
        "a red circle left of a blue square",
        "a large green triangle",
        "a red circle and a small blue cross",
        "nothing to see",
    ]
    positions = object_token_positions(encoder.tokenizer, texts, encoder.max_text_len)
    offsets = encoder.tokenizer(
        texts, truncation=True, max_length=encoder.max_text_len, return_offsets_mapping=True
    )["offset_mapping"]
    # Each position is the last token of the word (it ends where the word ends).
    ends = [
        [texts[i][: offsets[i][p][1]].split(" ")[-1] if p >= 0 else None for p in row]
        for i, row in enumerate(positions.tolist())
    ]
    assert ends[:3] == [["circle", "square"], ["triangle", None], ["circle", "cross"]]
    assert all(
        texts[i][offsets[i][p][1] : offsets[i][p][1] + 1] in ("", " ")
        for i, row in enumerate(positions[:3].tolist())
        for p in row
        if p >= 0
    )
    assert positions[3].tolist() == [-1, -1]


def test_every_patch_lies_in_one_cell_and_cells_follow_the_grid():
    cells = cell_patches(64)  # (3, 3, 64)
    np.testing.assert_array_equal(cells.sum(axis=(0, 1)), np.ones(64))
    top_right = cells[0, 2].reshape(8, 8)
    assert top_right[:3, 5:].all() and top_right.sum() == 9  # patch centres in the top-right third
    with pytest.raises(InvalidArgumentError, match="square patch grid, got 50 patches"):
        cell_patches(50)


def _scene(*objects: tuple[str, str, str, int, int]) -> Scene:
    return Scene(
        tuple(
            SceneObject(Colour(c), Shape(s), Size(z), row, col, 0, 0, 1)
            for c, s, z, row, col in objects
        )
    )


def test_object_masks_cover_the_named_objects_cells():
    scenes = SceneArrays.from_scenes(
        [
            _scene(("red", "circle", "small", 0, 0), ("blue", "square", "large", 2, 2)),
            _scene(("red", "circle", "small", 1, 1), ("red", "circle", "large", 0, 2)),
        ]
    )
    specs = SpecArrays.from_specs(
        [
            parse_query("a red circle left of a blue square"),
            parse_query("a large red circle"),
            parse_query("a red circle"),
            parse_query("a green cross"),
        ]
    )
    cells = cell_patches(16)
    masks = object_cell_masks(specs, scenes, np.array([0, 1, 2, 3]), np.array([0, 1, 1, 0]), 16)
    assert masks.shape == (4, 16, 2)
    np.testing.assert_array_equal(masks[0, :, 0], cells[0, 0])  # the red circle, top left
    np.testing.assert_array_equal(masks[0, :, 1], cells[2, 2])  # the blue square, bottom right
    np.testing.assert_array_equal(masks[1, :, 0], cells[0, 2])  # the size picks the large one
    np.testing.assert_array_equal(masks[2, :, 0], cells[1, 1] + cells[0, 2])  # both red circles
    assert not masks[1:, :, 1].any() and not masks[3].any()  # no second object; an absent one


def test_the_loss_is_the_mean_negative_log_mass_of_the_supervised_objects():
    attended = torch.tensor([[[0.5, 0.1], [0.2, 0.25]], [[0.9, 0.9], [0.9, 0.9]]])  # (B=2, n=2, 2)
    positions = torch.tensor([[0, 1], [1, -1]])
    masks = torch.ones(2, 4, 2)
    masks[1, :, 0] = 0  # the second row's first object is absent: not supervised
    loss, mass = attention_supervision_loss(attended, positions, masks)
    expected = -(np.log(0.5) + np.log(0.25)) / 2
    assert float(loss) == pytest.approx(expected) and mass == pytest.approx(0.375)
    assert attention_supervision_loss(attended, torch.full((2, 2), -1), masks) == (None, None)
