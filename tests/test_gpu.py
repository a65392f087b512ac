"""The whole pipeline on a CUDA device agrees with the CPU: fp16 encoding, GPU reranking.

Skipped unless ``torch.cuda.is_available()``; run with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_and_cpu_index(
    tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_clip: Path
):
    from crossrank import Index

    root = tmp_path_factory.mktemp("gpu")
    on_gpu = Index.build(
        image_folder, root / "gpu.idx", model=tiny_clip, device="cuda", batch_size=8
    )
    on_cpu = Index.build(
        image_folder, root / "cpu.idx", model=tiny_clip, device="cpu", batch_size=8
    )
    return on_gpu, on_cpu


def test_fp16_cuda_build_matches_cpu_build(cuda_and_cpu_index) -> None:
    on_gpu, on_cpu = cuda_and_cpu_index
    assert len(on_gpu) == len(on_cpu)
    xb_gpu = np.load(on_gpu.generation_dir / "vectors.npy")
    xb_cpu = np.load(on_cpu.generation_dir / "vectors.npy")
    # fp16 activations: cosines of the same image's vectors from both devices stay near 1.
    cos = (xb_gpu * xb_cpu).sum(axis=1)
    assert cos.min() > 0.999
    rows = np.arange(len(on_gpu))
    patches_gpu = on_gpu.patches.gather(rows).astype(np.float32)
    patches_cpu = on_cpu.patches.gather(rows).astype(np.float32)
    np.testing.assert_allclose(patches_gpu, patches_cpu, atol=2e-2, rtol=2e-2)


def test_cuda_search_with_maxsim_matches_cpu(cuda_and_cpu_index) -> None:
    on_gpu, on_cpu = cuda_and_cpu_index
    for query in ("a red circle left of a blue square", "a green triangle"):
        gpu = on_gpu.search(query, k=5, rerank_k=20, reranker="maxsim")
        cpu = on_cpu.search(query, k=5, rerank_k=20, reranker="maxsim")
        assert [h.rerank_score is not None for h in gpu] == [True] * len(gpu)
        np.testing.assert_allclose(
            [h.first_stage_score for h in gpu], [h.first_stage_score for h in cpu], atol=5e-3
        )
        np.testing.assert_allclose(
            sorted(h.score for h in gpu), sorted(h.score for h in cpu), atol=5e-3
        )
