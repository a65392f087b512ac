from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from crossrank.indexes import FirstStage, IndexConfig, first_stage
from crossrank.indexes.gpu import GpuCopy, gpu_count, gpu_device_for

from ._vectors import assert_same_knn


def _cuda_and_faiss_gpu() -> bool:
    if gpu_count(faiss) == 0:  # faiss-cpu, or no device: no need to pay for importing torch
        return False
    import torch

    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(
    not _cuda_and_faiss_gpu(), reason="needs a CUDA device and faiss-gpu"
)

FAKE_FAISS_GPU = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 2)


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", None), ("auto", 0), ("cuda", 0), ("cuda:1", 1), ("CUDA:1", 1)]
)
def test_gpu_device_for_a_machine_with_two_gpus(device, expected):
    assert gpu_device_for(device, FAKE_FAISS_GPU) == expected


def test_gpu_that_faiss_does_not_see_falls_back_to_the_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="crossrank.indexes.gpu"):
        assert gpu_device_for("cuda:2", FAKE_FAISS_GPU) is None
    assert "device 'cuda:2' was asked for, but faiss sees 2 GPU(s)" in caplog.text


def test_faiss_cpu_searches_on_the_cpu(caplog):
    faiss_cpu = SimpleNamespace(get_num_gpus=lambda: 0)  # faiss-cpu has no StandardGpuResources
    assert gpu_count(faiss_cpu) == 0
    assert gpu_device_for("auto", faiss_cpu) is None
    with caplog.at_level(logging.WARNING, logger="crossrank.indexes.gpu"):
        assert gpu_device_for("cuda", faiss_cpu) is None
    assert "faiss-cpu is installed; pip install 'crossrank[gpu]'" in caplog.text


class SpyIndex:
    """Stands in for a GPU index on a CPU machine: a CPU clone that counts its searches."""

    def __init__(self, index):
        self.index = faiss.clone_index(index)
        self.calls = 0

    def search(self, xq, k, params=None):
        self.calls += 1
        assert params is None or params.sel is None, "GPU searches must carry no selector"
        return self.index.search(xq, k, params=params)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make FirstStage believe in a GPU: its 'GPU copy' is a SpyIndex."""
    copies = []

    def to_gpu(faiss_module, index, device):
        copies.append(SpyIndex(index))
        return GpuCopy(index=copies[-1], device=device, lock=threading.Lock())

    monkeypatch.setattr(
        first_stage, "gpu_device_for", lambda device, faiss_module: None if device == "cpu" else 0
    )
    monkeypatch.setattr(first_stage, "to_gpu", to_gpu)
    return copies


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_searches_are_routed_between_the_gpu_and_the_cpu_copy(fake_gpu, vectors, factory):
    gpu_stage = FirstStage.build(
        vectors.xb, vectors.ids, IndexConfig(factory=factory, device="cuda")
    )
    cpu_stage = FirstStage.build(
        vectors.xb, vectors.ids, IndexConfig(factory=factory, device="cpu")
    )
    assert gpu_stage.on_gpu and not cpu_stage.on_gpu and "on=cuda:0" in repr(gpu_stage)
    spy = fake_gpu[0]

    for nprobe in (2, 16):  # unfiltered: on the GPU, with the per-call nprobe
        got = gpu_stage.search(vectors.xq, 10, nprobe=nprobe)
        assert_same_knn(*got, *cpu_stage.search(vectors.xq, 10, nprobe=nprobe))
    assert spy.calls == 2

    allowed = np.sort(
        vectors.ids[::4]
    )  # filtered: on the CPU copy (GPU indexes take no IDSelector)
    got = gpu_stage.search(vectors.xq, 10, allowed_ids=allowed)
    assert_same_knn(*got, *cpu_stage.search(vectors.xq, 10, allowed_ids=allowed))
    gpu_stage.search(vectors.xq, 2049)  # beyond the GPU's k-selection: on the CPU
    gpu_stage.search(vectors.xq, 5, nprobe=4096)  # beyond the GPU's nprobe: on the CPU
    assert spy.calls == 2


def test_empty_index_is_not_copied_to_the_gpu(fake_gpu):
    stage = FirstStage.build(
        np.zeros((0, 8), np.float32), np.zeros(0, np.int64), IndexConfig(device="cuda")
    )
    assert not stage.on_gpu and fake_gpu == []


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8"])
def test_gpu_results_match_the_cpu(tmp_path, vectors, factory):
    cpu = FirstStage.build(vectors.xb, vectors.ids, IndexConfig(factory=factory, device="cpu"))
    gpu = FirstStage.build(vectors.xb, vectors.ids, IndexConfig(factory=factory, device="cuda"))
    assert gpu.on_gpu
    for nprobe in (1, 4, 16):
        assert_same_knn(
            *gpu.search(vectors.xq, 10, nprobe=nprobe),
            *cpu.search(vectors.xq, 10, nprobe=nprobe),
            atol=1e-4,
        )
    allowed = np.sort(vectors.ids[::3])
    assert_same_knn(
        *gpu.search(vectors.xq, 10, allowed_ids=allowed),
        *cpu.search(vectors.xq, 10, allowed_ids=allowed),
        atol=1e-4,
    )
    cpu.save(tmp_path / "x.faiss")  # a loaded (mmapped) index goes to the GPU as well
    loaded = FirstStage.load(tmp_path / "x.faiss", IndexConfig(device="auto"))
    assert loaded.on_gpu
    assert_same_knn(*loaded.search(vectors.xq, 10), *cpu.search(vectors.xq, 10), atol=1e-4)


@pytest.mark.gpu
@requires_gpu
def test_gpu_searches_from_eight_threads(vectors):
    gpu = FirstStage.build(
        vectors.xb, vectors.ids, IndexConfig(factory="IVF16,Flat", device="cuda")
    )
    expected = {nprobe: gpu.search(vectors.xq, 10, nprobe=nprobe) for nprobe in range(1, 9)}
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda nprobe: (nprobe, gpu.search(vectors.xq, 10, nprobe=nprobe)),
                list(range(1, 9)) * 4,
            )
        )
    for nprobe, (_, I) in results:
        np.testing.assert_array_equal(I, expected[nprobe][1])


@pytest.mark.gpu
@requires_gpu
def test_index_type_without_a_gpu_implementation_stays_on_the_cpu(vectors):
    stage = FirstStage.build(vectors.xb, vectors.ids, IndexConfig(factory="HNSW16", device="cuda"))
    assert not stage.on_gpu
    assert stage.search(vectors.xq, 3)[1].shape == (len(vectors.xq), 3)
