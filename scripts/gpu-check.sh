#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and this project installed with a CUDA build of PyTorch
# (`pip install torch` for the host's CUDA, then `pip install -e ".[test]"`). About 6-8 minutes on an H100:
#   1. the tests that need CUDA (tests/test_fastpath.py and any other test marked for a GPU);
#   2. `karlo bench` at full size (karlo-v1-alpha shapes, random weights built on the GPU) in bf16 against diffusers'
#      UnCLIPPipeline in fp16: images/s per batch size, the ratio at each one's best batch size, FLOP utilisation;
#   3. a 1-GPU `karlo generate` (examples/stage-configs/gpu-1.yaml, the bf16 fast path) on the tiny model: the whole
#      pipeline on the GPU, placement included; its images/s is the data path's, not the full model's.
# Prints one table at the end; the JSON of each step stays in $OUT (default: a temp folder) for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
KARLO=${KARLO:-karlo}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU is visible: this check needs one")'

echo "== 1. CUDA tests" >&2
"$PY" -m pytest tests/test_fastpath.py -q -x -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/tests.txt" >&2

echo "== 2. full-size model vs diffusers, and each stage" >&2
"$KARLO" bench all --preset karlo-v1-alpha --random-weights --device cuda --dtype bfloat16 \
  --reference-dtype float16 --only model --only stages --batch-size 1 --batch-size 8 --batch-size 16 \
  --stage-batch-size 8 --repeats 1 --json > "$OUT/bench.json"

echo "== 3. one-GPU karlo generate, bf16 fast path" >&2
"$PY" - "$OUT/prompts.parquet" <<'PYEOF'
import sys, pyarrow as pa, pyarrow.parquet as pq
prompts = ["a red cube on a table", "a watercolor fox", "a city at night", "a bowl of fruit"] * 64
pq.write_table(pa.table({"prompt": prompts, "seed": list(range(len(prompts)))}), sys.argv[1])
PYEOF
RAY_ADDRESS=local "$KARLO" generate "$OUT/prompts.parquet" "$OUT/run" --device cuda --dtype bfloat16 \
  --stage-config examples/stage-configs/gpu-1.yaml --progress-interval 0 --overwrite > "$OUT/generate.txt" 2>&1

"$PY" - "$OUT" <<'PYEOF'
import json, sys, torch
out = sys.argv[1]
bench = json.load(open(f"{out}/bench.json"))
model, stages = bench["model"], bench["stages"]
manifest = json.load(open(f"{out}/run/manifest.json"))
rows = [("device", torch.cuda.get_device_name(0))]
for b in model["batches"]:
    rows.append((f"full size, batch {b['batch']}: karlo bf16 / diffusers fp16 images/s",
                 f"{b['karlo_images_per_s']:.3f} / {b['diffusers_images_per_s']:.3f} (ratio {b['ratio']:.2f})"))
rows.append(("ratio at each one's best batch size", f"{model['best_ratio']:.2f} (target >= 2.5)"))
best = max(b["karlo_images_per_s"] for b in model["batches"])
rows.append(("karlo images/s at its best batch size", f"{best:.2f} (target >= 5)"))
for row in stages["stages"] if isinstance(stages, dict) and "stages" in stages else stages:
    rows.append((f"stage {row['stage']}: FLOP utilisation", f"{row['flop_utilisation']:.1%}"))
last = manifest["last_attempt"]
rows.append(("1-GPU generate (tiny model), images/s after start-up",
             f"{last.get('images_per_second_after_start_up')} ({last['images']} images)"))
rows.append(("1-GPU generate: where the stage actors ran",
             ", ".join(f"{a['stage']}@GPU{a['gpu_ids']}" for a in manifest.get("actors", []))))
width = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{width}}  {v}")
PYEOF
echo "JSON and logs: $OUT" >&2
