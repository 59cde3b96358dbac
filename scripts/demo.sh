#!/usr/bin/env bash
# The main job, on a fresh machine: install, then on the default base model (SmolLM2-135M-Instruct)
# tune one soft prompt per example task and show held-out accuracy before and after tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

DIR=${DEMO_DIR:-demo-project}
DATA=examples/data
STEPS=${DEMO_STEPS:-40}
rm -rf "$DIR"
start=$(date +%s)
ptcli init "$DIR" --num-prompt-tokens 16

# One file per task for tuning (a training file holds one tag); the test file mixes both tags.
mkdir -p "$DIR/data"
for tag in reviews topic; do
  for split in train valid; do
    grep "\"prompt_tag\": \"$tag\"" "$DATA/$split.jsonl" > "$DIR/data/$tag-$split.jsonl"
  done
done
ptcli add-task reviews -p "$DIR" --train "$DIR/data/reviews-train.jsonl" --valid "$DIR/data/reviews-valid.jsonl" \
  --init-text "is this review positive or negative" --lr 0.05 --batch-size 16 --warmup-steps 5 --val-check-interval 20
ptcli add-task topic -p "$DIR" --train "$DIR/data/topic-train.jsonl" --valid "$DIR/data/topic-valid.jsonl" \
  --init-text "is this news about sports food or science" --lr 0.05 --batch-size 16 --warmup-steps 5 --val-check-interval 20

# Before: the prompts as initialised from text (0 steps), scored on the held-out test file.
for tag in reviews topic; do ptcli tune -p "$DIR" --tag "$tag" --max-steps 0 --quiet; done
ptcli infer -p "$DIR" "$DATA/test.jsonl" --json --quiet --tokens-to-generate 4 > "$DIR/before.json"

# After: tune each prompt (the other stays frozen in the bank), then score the same file.
for tag in reviews topic; do ptcli tune -p "$DIR" --tag "$tag" --max-steps "$STEPS" --overwrite; done
ptcli infer -p "$DIR" "$DATA/test.jsonl" --json --quiet --tokens-to-generate 4 > "$DIR/after.json"

ptcli list-tags -p "$DIR"
python - "$DIR" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
d, secs = sys.argv[1], sys.argv[2]
before = json.load(open(f"{d}/before.json"))["accuracy"]
after = json.load(open(f"{d}/after.json"))["accuracy"]
print(f"\nheld-out accuracy on examples/data/test.jsonl (exact match), {secs} s in all")
print(f"{'tag':<10}{'before':>10}{'after':>10}{'n':>6}")
for tag in sorted(after):
    print(f"{tag:<10}{before[tag]['accuracy']:>10.3f}{after[tag]['accuracy']:>10.3f}{after[tag]['total']:>6}")
PY
