"""ORT's per-operator profile of one exported model at one k (12 runs; the 15 costliest nodes).

python profile_ort.py MODEL K [SHAPE]   # SHAPE: demo (default) or clip-b16
"""

from __future__ import annotations

import collections
import json
import sys

import onnxruntime as ort
from common import MODELS, inputs, load


def main() -> None:
    path, k = sys.argv[1], int(sys.argv[2])
    shape = sys.argv[3] if len(sys.argv) > 3 else "demo"
    m, n_patches = load(shape)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    (MODELS / "prof").mkdir(parents=True, exist_ok=True)
    so.enable_profiling, so.profile_file_prefix = True, str(MODELS / "prof" / "p")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    tokens, _, patches = inputs(m, k, n_patches)
    feed = {"tokens": tokens.numpy(), "patches": patches.numpy()}
    runs = 12
    for _ in range(runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    total: collections.Counter = collections.Counter()
    shapes = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = (e["args"]["op_name"], e["name"][: -len("_kernel_time")])
            total[key] += e["dur"]
            shapes[key] = e["args"].get("output_type_shape")
    print(f"total node us per run {sum(total.values()) / runs:.0f}")
    for key, us in total.most_common(15):
        print(
            f"{us / runs / 1000:7.2f} ms  {key[0]:22s} {key[1][:60]:60s} "
            f"{json.dumps(shapes[key])[:120]}"
        )


if __name__ == "__main__":
    main()
