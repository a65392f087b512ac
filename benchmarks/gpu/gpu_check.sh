#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (its python has torch+CUDA, transformers,
# pyarrow; duckdb and faiss-cpu travel as wheels in .whl/). Writes logs under $OUT (or ./gpu-out).
# Run from the repository root:
#   bash benchmarks/gpu/gpu_check.sh
# $OUT/bench_rerank_cuda.json is what benchmarks/results/bench_rerank_device/ keeps, one file per
# card (bench_rerank_cuda_h200.json).
set -uo pipefail
. "$(dirname "$0")/_gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# Every test marked gpu (CUDA encoders, rerankers, the whole pipeline), then the full suites of the
# torch subpackages on this machine for good measure.
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
python3 -m pytest -q -p no:cacheprovider tests/rerank tests/encoders tests/api/test_index.py -x 2>&1 | tee "$OUT/torch_tests.txt" | tail -5
python3 benchmarks/gpu/bench_rerank_device.py --device cuda --json > "$OUT/bench_rerank_cuda.json" && python3 - "$OUT/bench_rerank_cuda.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(r["card"], r["torch"])
for row in r["rerank"]:
    print(f"{row['shape']:9} k={row['k']:<5} {row['reranker']:16} host {row['host_ms']:8.3f} ms  resident {row['resident_ms']:8.3f} ms")
print("encoder", r["encoder"])
PY
