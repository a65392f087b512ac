"""blip-itm: ITM from cached vision tokens equals BLIP's full forward, in a batch and via Index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests._models import make_tiny_blip

torch = pytest.importorskip("torch")

QUERIES = ["a red circle left of a blue square", "a green star", "a large cat"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="module")
def blip_encoder(tiny_blip: Path):
    from crossrank.encoders import load_encoder

    return load_encoder(tiny_blip, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def reference(tiny_blip: Path):
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()


@pytest.fixture(scope="module")
def reranker(tiny_blip: Path):
    from crossrank.rerank import BlipItmReranker

    return BlipItmReranker.from_pretrained(str(tiny_blip), "cpu")


@pytest.fixture(scope="module")
def pixels(blip_encoder) -> torch.Tensor:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(7)]
    return blip_encoder.preprocess(images)  # (7, 3, 32, 32)


def full_forward(
    reference, input_ids: np.ndarray, mask: np.ndarray, pixels: torch.Tensor
) -> np.ndarray:
    """P(match) from BlipForImageTextRetrieval itself, re-running the vision model per image."""
    k = pixels.shape[0]
    with torch.no_grad():
        logits = reference(
            input_ids=torch.from_numpy(input_ids)[None].expand(k, -1),
            pixel_values=pixels,
            attention_mask=torch.from_numpy(mask).long()[None].expand(k, -1),
            use_itm_head=True,
        ).itm_score  # (k, 2)
    return logits.softmax(dim=-1)[:, 1].numpy()


def direct_itm(
    reference, input_ids: np.ndarray, mask: np.ndarray, patches: np.ndarray
) -> np.ndarray:
    """P(match) from the text encoder and ITM head over given vision tokens, one at a time."""
    out = []
    with torch.no_grad():
        for row in patches:
            image = torch.from_numpy(row.astype(np.float32))[None]
            h = reference.text_encoder(
                input_ids=torch.from_numpy(input_ids)[None],
                attention_mask=torch.from_numpy(mask).long()[None],
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
            )
            out.append(reference.itm_head(h.last_hidden_state[:, 0]).softmax(-1)[0, 1].item())
    return np.array(out, dtype=np.float32)


def test_cached_scores_equal_the_full_forward(blip_encoder, reference, reranker, pixels) -> None:
    patches = blip_encoder.encode_pixels(
        pixels
    ).patches  # (7, 17, 32): the vision model runs once, here
    text = blip_encoder.encode_text(QUERIES)
    for i in range(len(QUERIES)):
        n = int(text.mask[i].sum())  # the query on its own, no padding from the longer texts
        ids, mask = text.input_ids[i, :n], text.mask[i, :n]
        scores = reranker.score(text.tokens[i, :n], mask, patches, input_ids=ids)
        assert scores.dtype == torch.float32 and scores.shape == (7,)
        np.testing.assert_allclose(
            scores.numpy(), full_forward(reference, ids, mask, pixels), atol=1e-5
        )
        # The check can fail: the images get clearly different scores.
        assert float(scores.max() - scores.min()) > 1e-3


def test_padded_query_scores_equal_the_unpadded_one(blip_encoder, reranker, pixels) -> None:
    patches = blip_encoder.encode_pixels(pixels).patches
    text = blip_encoder.encode_text(QUERIES)  # "a green star" is padded to the longest query
    n = int(text.mask[1].sum())
    assert n < text.mask.shape[1]
    padded = reranker.score(text.tokens[1], text.mask[1], patches, input_ids=text.input_ids[1])
    alone = reranker.score(
        text.tokens[1, :n], text.mask[1, :n], patches, input_ids=text.input_ids[1, :n]
    )
    np.testing.assert_allclose(padded.numpy(), alone.numpy(), atol=1e-5)


def test_batched_scores_equal_per_candidate_scores(blip_encoder, reranker, pixels) -> None:
    patches = blip_encoder.encode_pixels(pixels).patches
    text = blip_encoder.encode_text(QUERIES[:1])
    batched = reranker.score(text.tokens[0], text.mask[0], patches, input_ids=text.input_ids[0])
    single = [
        reranker.score(
            text.tokens[0], text.mask[0], patches[j : j + 1], input_ids=text.input_ids[0]
        ).item()
        for j in range(len(patches))
    ]
    np.testing.assert_allclose(batched.numpy(), single, atol=1e-6)


def test_a_patch_mask_with_padding_is_refused(blip_encoder, reranker, pixels) -> None:
    from crossrank.errors import InvalidArgumentError

    patches = blip_encoder.encode_pixels(pixels).patches  # (7, 17, 32)
    text = blip_encoder.encode_text(QUERIES[:1])
    patch_mask = np.ones((7, 17), dtype=bool)
    plain = reranker.score(text.tokens[0], text.mask[0], patches, input_ids=text.input_ids[0])
    all_real = reranker.score(
        text.tokens[0], text.mask[0], patches, patch_mask, input_ids=text.input_ids[0]
    )
    np.testing.assert_array_equal(all_real.numpy(), plain.numpy())
    patch_mask[:, -3:] = False
    with pytest.raises(
        InvalidArgumentError, match="a patch_mask with False entries is not supported"
    ):
        reranker.score(
            text.tokens[0], text.mask[0], patches, patch_mask, input_ids=text.input_ids[0]
        )


def test_no_candidates_gives_an_empty_score(blip_encoder, reranker) -> None:
    text = blip_encoder.encode_text(QUERIES[:1])
    scores = reranker.score(
        text.tokens[0], text.mask[0], np.zeros((0, 17, 32), np.float16), input_ids=text.input_ids[0]
    )
    assert scores.shape == (0,) and scores.dtype == torch.float32


# -- through Index ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip_index(
    tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_blip: Path
) -> Path:
    from crossrank.write.build import build_index

    path = tmp_path_factory.mktemp("indexes") / "blip.idx"
    build_index(image_folder, path, model=tiny_blip, device="cpu", batch_size=8, workers=2)
    return path


def test_index_search_with_blip_itm_equals_the_direct_forward(
    blip_index: Path, blip_encoder, reference
) -> None:
    from PIL import Image

    from crossrank import Index

    index = Index.open(blip_index, device="cpu")
    assert index.info()["patches"]["dim"] == 32
    result = index.search(QUERIES[0], k=5, rerank_k=20, reranker="blip-itm")
    assert [h.rerank_score for h in result.hits] == sorted(
        (h.rerank_score for h in result.hits), reverse=True
    )
    text = blip_encoder.encode_text(QUERIES[:1])
    ids, mask = text.input_ids[0], text.mask[0]
    hit_ids = np.array([h.id for h in result.hits])
    stored = index.patches.gather(index.stored.rows_of_ids(hit_ids))  # (5, 17, 32) fp16
    got = np.array([h.rerank_score for h in result.hits])
    # Exactly the ITM of the stored (fp16) vision tokens ...
    np.testing.assert_allclose(got, direct_itm(reference, ids, mask, stored), atol=1e-5)
    # ... and, up to that fp16 rounding, BLIP's full forward on the images themselves.
    pixels = blip_encoder.preprocess([Image.open(h.path).convert("RGB") for h in result.hits])
    np.testing.assert_allclose(got, full_forward(reference, ids, mask, pixels), atol=1e-3)
    # scores.rerank is P(match); fusion sum adds the ITC cosine.
    assert all(0.0 <= s <= 1.0 for s in got)
    fused = index.search(QUERIES[0], k=5, rerank_k=20, reranker="blip-itm", fusion="sum")
    for hit in fused.hits:
        assert hit.score == pytest.approx(hit.rerank_score + hit.first_stage_score, abs=1e-6)


def test_auto_reranker_on_a_blip_index_is_blip_itm(blip_index: Path) -> None:
    from crossrank import Index

    index = Index.open(blip_index, device="cpu")
    assert index.default_reranker == "blip-itm"
    auto = index.search(QUERIES[1], k=3, rerank_k=10)
    explicit = index.search(QUERIES[1], k=3, rerank_k=10, reranker="blip-itm")
    assert [h.id for h in auto.hits] == [h.id for h in explicit.hits]
    assert auto.hits[0].rerank_score == pytest.approx(explicit.hits[0].rerank_score)


def test_maxsim_on_a_blip_index_is_refused(blip_index: Path) -> None:
    from crossrank import Index
    from crossrank.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="not in one space; use --reranker blip-itm"):
        Index.open(blip_index, device="cpu").search(QUERIES[0], reranker="maxsim")


def test_image_query_with_blip_itm_is_refused(blip_index: Path, image_folder: Path) -> None:
    from crossrank import Index
    from crossrank.errors import InvalidArgumentError

    image = image_folder / "img_000.png"
    index = Index.open(blip_index, device="cpu")
    with pytest.raises(InvalidArgumentError, match="reranks text queries only"):
        index.search(image, reranker="blip-itm")
    assert index.search(image, k=3, reranker="none").hits


def test_blip_index_searched_with_a_clip_model_is_refused(
    blip_index: Path, tiny_clip: Path
) -> None:
    from crossrank import Index
    from crossrank.errors import ModelMismatchError

    with pytest.raises(
        ModelMismatchError,
        match="was built with model .*tiny-blip.*search it with the same --model",
    ):
        Index.open(blip_index, device="cpu", model=tiny_clip)


def test_blip_itm_on_a_clip_index_is_refused(built_index: Path) -> None:
    from crossrank import Index
    from crossrank.errors import ModelMismatchError

    with pytest.raises(
        ModelMismatchError, match="needs an index built with a BLIP retrieval model"
    ):
        Index.open(built_index, device="cpu").search("a red circle", reranker="blip-itm")


# -- errors ----------------------------------------------------------------------------------------


def test_get_reranker_blip_itm_needs_encoder_info() -> None:
    from crossrank.errors import InvalidArgumentError
    from crossrank.rerank import get_reranker

    with pytest.raises(InvalidArgumentError, match="loads the BLIP model an index was built with"):
        get_reranker("blip-itm", "cpu")


def test_get_reranker_blip_itm_loads_the_index_model(blip_encoder) -> None:
    from crossrank.rerank import BlipItmReranker, get_reranker

    rr = get_reranker("BLIP-ITM", "cpu", encoder_info=blip_encoder.info)
    assert isinstance(rr, BlipItmReranker) and rr.name == "blip-itm"


def test_other_weights_than_the_index_model_are_refused(blip_encoder, tmp_path: Path) -> None:
    from crossrank.errors import ModelMismatchError
    from crossrank.rerank import BlipItmReranker

    other = make_tiny_blip(tmp_path / "other-blip", seed=1)
    with pytest.raises(ModelMismatchError, match="differ from the model the index was built with"):
        BlipItmReranker.from_pretrained(str(other), "cpu", encoder_info=blip_encoder.info)


def test_a_clip_dir_is_not_a_blip_retrieval_model(tiny_clip: Path) -> None:
    from crossrank.errors import ModelError
    from crossrank.rerank import BlipItmReranker

    with pytest.raises(ModelError, match="model_type 'clip', not 'blip'"):
        BlipItmReranker.from_pretrained(str(tiny_clip), "cpu")


def test_a_blip_captioning_dir_is_not_a_retrieval_model(tmp_path: Path) -> None:
    from crossrank.errors import ModelError
    from crossrank.rerank import BlipItmReranker

    path = make_tiny_blip(tmp_path / "caption", architecture="BlipForConditionalGeneration")
    with pytest.raises(
        ModelError, match="BlipForConditionalGeneration checkpoint, not an image-text retrieval"
    ):
        BlipItmReranker.from_pretrained(str(path), "cpu")


def test_score_without_input_ids_is_refused(blip_encoder, reranker) -> None:
    from crossrank.errors import InvalidArgumentError

    text = blip_encoder.encode_text(QUERIES[:1])
    with pytest.raises(InvalidArgumentError, match="needs the query's token ids"):
        reranker.score(text.tokens[0], text.mask[0], np.zeros((2, 17, 32), np.float32))


def test_input_ids_of_another_length_are_refused(blip_encoder, reranker) -> None:
    from crossrank.errors import InvalidArgumentError

    text = blip_encoder.encode_text(QUERIES[:1])
    with pytest.raises(InvalidArgumentError, match=r"input_ids must be \(\d+,\) integer token ids"):
        reranker.score(
            text.tokens[0],
            text.mask[0],
            np.zeros((2, 17, 32), np.float32),
            input_ids=text.input_ids[0, :-1],
        )
    with pytest.raises(InvalidArgumentError, match="integer token ids"):
        reranker.score(
            text.tokens[0],
            text.mask[0],
            np.zeros((2, 17, 32), np.float32),
            input_ids=text.input_ids[0].astype(np.float32),
        )


def test_patches_of_another_width_are_refused(blip_encoder, reranker) -> None:
    from crossrank.errors import InvalidArgumentError

    text = blip_encoder.encode_text(QUERIES[:1])
    with pytest.raises(
        InvalidArgumentError, match="patches have dim 48, but .* vision tokens of dim 32"
    ):
        reranker.score(
            text.tokens[0],
            text.mask[0],
            np.zeros((2, 17, 48), np.float32),
            input_ids=text.input_ids[0],
        )


# -- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_scores_match_cpu(tiny_blip: Path, blip_encoder, reranker, pixels) -> None:
    from crossrank.rerank import BlipItmReranker

    on_gpu = BlipItmReranker.from_pretrained(str(tiny_blip), "cuda")
    patches = blip_encoder.encode_pixels(pixels).patches.astype(
        np.float16
    )  # as the patch store holds them
    text = blip_encoder.encode_text(QUERIES[:1])
    gpu = on_gpu.score(text.tokens[0], text.mask[0], patches, input_ids=text.input_ids[0])
    cpu = reranker.score(text.tokens[0], text.mask[0], patches, input_ids=text.input_ids[0])
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), atol=2e-2)  # bf16 autocast


# -- explain ---------------------------------------------------------------------------------------


def own_cross_attention(
    reference, input_ids: np.ndarray, mask: np.ndarray, patches: np.ndarray
) -> np.ndarray:
    """The last layer's cross-attention of BLIP's own text encoder, heads averaged, one image at
    a time: ``(k, n_tokens, 1 + P)``."""
    out = []
    with torch.no_grad():
        for row in patches:
            image = torch.from_numpy(row.astype(np.float32))[None]
            attn = reference.text_encoder(
                input_ids=torch.from_numpy(input_ids)[None],
                attention_mask=torch.from_numpy(mask).long()[None],
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
                output_attentions=True,
            ).cross_attentions[-1]  # (1, heads, n_tokens, 1 + P)
            out.append(attn[0].mean(dim=0).numpy())
    return np.stack(out)


def test_explain_maps_are_the_models_last_layer_cross_attention(
    blip_encoder, reference, reranker, pixels
) -> None:
    patches = blip_encoder.encode_pixels(pixels).patches  # (7, 17, 32)
    text = blip_encoder.encode_text(QUERIES)  # padded to the longest query
    for i in range(len(QUERIES)):
        mask = text.mask[i]
        n = int(mask.sum())
        maps = reranker.explain(text.tokens[i], mask, patches, input_ids=text.input_ids[i])
        assert maps.dtype == torch.float32 and maps.shape == (7, mask.shape[0], 17)
        own = own_cross_attention(reference, text.input_ids[i, :n], mask[:n], patches)
        np.testing.assert_allclose(maps[:, :n].numpy(), own, atol=1e-5)
        # Each real token's weights sum to 1 over the stored vision tokens (class token included).
        np.testing.assert_allclose(maps[:, :n].sum(-1).numpy(), 1.0, atol=1e-5)
        assert not maps[:, n:].any()  # padding stands for no word
        # The check can fail: the maps differ between images and between tokens.
        assert float((maps[0, :n] - maps[1, :n]).abs().max()) > 1e-3
        assert float((maps[0, 1] - maps[0, 2]).abs().max()) > 1e-3


def test_explain_changes_no_score(blip_encoder, reranker, pixels) -> None:
    patches = blip_encoder.encode_pixels(pixels).patches
    text = blip_encoder.encode_text(QUERIES[:1])
    args = (text.tokens[0], text.mask[0], patches)
    before = reranker.score(*args, input_ids=text.input_ids[0])
    reranker.explain(*args, input_ids=text.input_ids[0])
    after = reranker.score(*args, input_ids=text.input_ids[0])
    assert torch.equal(before, after)


def test_explain_in_chunks_equals_one_batch(blip_encoder, reranker, pixels, monkeypatch) -> None:
    patches = blip_encoder.encode_pixels(pixels).patches
    text = blip_encoder.encode_text(QUERIES[:1])
    args = (text.tokens[0], text.mask[0], patches)
    whole = reranker.explain(*args, input_ids=text.input_ids[0])
    monkeypatch.setattr(type(reranker), "explain_chunk", 3)  # 7 candidates: 3 + 3 + 1
    chunked = reranker.explain(*args, input_ids=text.input_ids[0])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_explain_checks_as_score_does(blip_encoder, reranker) -> None:
    from crossrank.errors import InvalidArgumentError

    text = blip_encoder.encode_text(QUERIES[:1])
    with pytest.raises(InvalidArgumentError, match="needs the query's token ids"):
        reranker.explain(text.tokens[0], text.mask[0], np.zeros((2, 17, 32), np.float32))
    empty = reranker.explain(
        text.tokens[0], text.mask[0], np.zeros((0, 17, 32), np.float16), input_ids=text.input_ids[0]
    )
    assert empty.shape == (0, text.mask.shape[1], 17)


def test_index_search_with_blip_itm_explains_each_word(
    blip_index: Path, blip_encoder, reference
) -> None:
    from crossrank import Index

    index = Index.open(blip_index, device="cpu")
    plain = index.search(QUERIES[0], k=4, rerank_k=12, reranker="blip-itm")
    told = index.search(QUERIES[0], k=4, rerank_k=12, reranker="blip-itm", explain=True)
    ranked = [[(h.id, h.score, h.rerank_score) for h in r.hits] for r in (plain, told)]
    assert ranked[0] == ranked[1]  # explaining changes no score and no ranking
    assert not any(note.startswith("explain:") for note in told.notes)
    assert all(hit.explain is None for hit in plain.hits)

    text = blip_encoder.encode_text(QUERIES[:1])
    ids, mask = text.input_ids[0], text.mask[0]
    # Row 0 is [CLS] and the last [SEP]: the words are the rows in between.
    assert blip_encoder.tokenizer.convert_ids_to_tokens([int(ids[0]), int(ids[-1])]) == [
        "[CLS]",
        "[SEP]",
    ]
    hit_ids = np.array([h.id for h in told.hits])
    stored = index.patches.gather(index.stored.rows_of_ids(hit_ids))  # (4, 17, 32) fp16
    own = own_cross_attention(reference, ids, mask, stored)  # (4, n_tokens, 17)
    for hit, hit_own in zip(told.hits, own, strict=True):
        ex = hit.explain
        assert ex.tokens == tuple(QUERIES[0].split())
        assert ex.grid == (4, 4)  # 1 + 4 * 4 stored vision tokens: the class slot is left out
        assert ex.maps.shape == (len(ex.tokens), 16)
        # The words' rows, without the class slot; with it, each word's weights sum to 1.
        np.testing.assert_allclose(ex.maps, hit_own[1:-1, 1:], atol=1e-5)
        np.testing.assert_allclose(ex.maps.sum(-1) + hit_own[1:-1, 0], 1.0, atol=1e-5)
    data = told.to_dict()["hits"][0]["explain"]
    assert data["tokens"] == QUERIES[0].split() and data["grid"] == [4, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_explain_matches_cpu(tiny_blip: Path, blip_encoder, reranker, pixels) -> None:
    from crossrank.rerank import BlipItmReranker

    on_gpu = BlipItmReranker.from_pretrained(str(tiny_blip), "cuda")
    patches = blip_encoder.encode_pixels(pixels).patches.astype(np.float16)
    text = blip_encoder.encode_text(QUERIES)
    args = (text.tokens[1], text.mask[1], patches)  # a padded query
    gpu = on_gpu.explain(*args, input_ids=text.input_ids[1])
    cpu = reranker.explain(*args, input_ids=text.input_ids[1])
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    n = int(text.mask[1].sum())
    np.testing.assert_allclose(gpu[:, :n].sum(-1).numpy(), 1.0, atol=1e-3)
    assert not gpu[:, n:].any()
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), atol=2e-2)  # bf16 autocast


def test_bfloat16_precision_runs_the_text_encoder_in_bf16_on_the_cpu(
    tiny_blip: Path, blip_encoder, pixels
) -> None:
    """``precision="bfloat16"`` autocasts BLIP's text encoder on the CPU too: the scores move a
    little (autocast ran) and stay float32 probabilities; ``float32`` is the reference."""
    from crossrank import Precision
    from crossrank.rerank import get_reranker

    info = blip_encoder.info
    patches = blip_encoder.encode_pixels(pixels).patches
    text = blip_encoder.encode_text(QUERIES[:1])
    args = (text.tokens[0], text.mask[0], patches)
    scores = {}
    for precision in ("float32", "bfloat16"):
        blip = get_reranker("blip-itm", "cpu", encoder_info=info, precision=precision)
        assert blip.precision is Precision(precision)
        scores[precision] = blip.score(*args, input_ids=text.input_ids[0])
    assert scores["bfloat16"].dtype == torch.float32
    diff = float((scores["bfloat16"] - scores["float32"]).abs().max())
    assert 0 < diff < 0.05
