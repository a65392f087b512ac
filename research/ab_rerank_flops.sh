#!/bin/bash
# A/B of benchmarks/bench_rerank_flops.py between two source trees, alternated three times:
#   research/ab_rerank_flops.sh BASE_TREE NEW_TREE OUT_DIR [bench args...]
# BASE_TREE e.g. `git archive HEAD | tar -x -C /tmp/base`; NEW_TREE the working tree (a patch
# applied). Each run imports crossrank from its own tree (PYTHONPATH); OUT_DIR gets
# {base,new}_{1,2,3}.json and the p50s and ratios are printed side by side.
set -euo pipefail
base=$(realpath "$1"); new=$(realpath "$2"); out=$3; shift 3
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--shapes demo clip-b16 --rounds 11)
mkdir -p "$out"
for i in 1 2 3; do
  for side in base new; do
    dir=$base; [ "$side" = new ] && dir=$new
    (cd "$dir" && PYTHONPATH=$dir python benchmarks/bench_rerank_flops.py "${args[@]}" --json \
      > "$out/${side}_$i.json")
  done
done
python - "$out" <<'PY'
import glob, json, sys
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*_[0-9].json")):
    side = f.rsplit("/", 1)[-1].split("_")[0]
    for r in json.load(open(f))["rows"]:
        rows.setdefault((r["shapes"], r["k"], side), []).append((r["p50_ms"], r["vs_matmul"]))
for key in sorted(rows):
    print(key, "p50 ms", [round(a, 2) for a, _ in rows[key]],
          "vs matmul", [round(b, 3) for _, b in rows[key]])
PY
