"""GPU placement of the first stage through faiss-gpu (a no-op with faiss-cpu).

One ``StandardGpuResources`` per device is shared by every first stage in the process, with one
lock: FAISS GPU resources (streams, scratch memory) must not be used from two host threads at
once, so GPU searches on a device run one at a time (each is short; the CPU copy serves the
searches a GPU index cannot, like filtered ones, in parallel).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from crossrank.device import Device

__all__ = ["GpuCopy", "gpu_count", "gpu_device_for", "to_gpu", "GPU_MAX_K", "GPU_MAX_NPROBE"]

logger = logging.getLogger(__name__)

#: Largest k (and nprobe) FAISS's GPU k-selection supports; larger searches run on the CPU copy.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048

_RESOURCES: dict[int, tuple[Any, threading.Lock]] = {}
_RESOURCES_LOCK = threading.Lock()


@dataclass
class GpuCopy:
    """A GPU clone of a CPU index, with the lock that serialises its searches."""

    index: Any  # faiss GPU index (or a CPU wrapper of GPU sub-indexes)
    device: int  # CUDA device number
    lock: threading.Lock  # shared by every GPU index on this device


def gpu_count(faiss: ModuleType) -> int:
    """GPUs faiss can use: 0 with faiss-cpu (which has no ``StandardGpuResources``)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a faiss-gpu build on a machine without a driver
        return 0


def gpu_device_for(device: str, faiss: ModuleType) -> int | None:
    """The CUDA device number to search on for an ``IndexConfig.device``, or ``None`` for the CPU.

    ``auto`` takes GPU 0 when faiss sees one. ``cuda``/``cuda:N`` on a machine where faiss sees
    no GPU (faiss-cpu installed, say) logs a warning and returns ``None``: the results are the
    same on the CPU, only slower, and the encoders may still use the GPU through torch.
    """
    name = str(device).lower()
    if name == Device.CPU:
        return None
    n = gpu_count(faiss)
    if name == Device.AUTO:
        return 0 if n > 0 else None
    number = int(name.partition(":")[2] or 0)
    if number >= n:
        logger.warning(
            "device %r was asked for, but faiss sees %d "
            "GPU(s)%s; the first stage searches on the CPU",
            device,
            n,
            ""
            if hasattr(faiss, "StandardGpuResources")
            else " (faiss-cpu is installed; pip install 'crossrank[gpu]' for faiss-gpu)",
        )
        return None
    return number


def _resources(faiss: ModuleType, device: int) -> tuple[Any, threading.Lock]:
    with _RESOURCES_LOCK:
        if device not in _RESOURCES:
            _RESOURCES[device] = (faiss.StandardGpuResources(), threading.Lock())
        return _RESOURCES[device]


def to_gpu(faiss: ModuleType, index: Any, device: int) -> GpuCopy | None:
    """Clone a CPU index onto GPU ``device``; ``None`` (and a log line) when FAISS cannot.

    Vectors stay float32 on the GPU (no fp16 storage), so scores match the CPU's up to float
    rounding. Index types without a GPU implementation (HNSW, for one) stay on the CPU.

    Args:
        faiss: the faiss module (faiss-gpu).
        index: the CPU index to clone (the inner index, not the IDMap: ids are mapped on the host).
        device: CUDA device number.

    Returns:
        The GPU copy, or ``None`` when this index type cannot go to the GPU.
    """
    res, lock = _resources(faiss, device)
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    try:
        with lock:
            gpu_index = faiss.index_cpu_to_gpu(res, device, index, options)
    except (RuntimeError, AttributeError) as e:
        logger.warning(
            "FAISS cannot put a %s on GPU %d; the first stage searches on the CPU (%s)",
            type(index).__name__,
            device,
            " ".join(str(e).split())[-200:],
        )
        return None
    return GpuCopy(index=gpu_index, device=device, lock=lock)
