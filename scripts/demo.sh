#!/usr/bin/env bash
# The main job, on a fresh machine: install, then on the default base model (SmolLM2-135M-Instruct)
# tune one soft prompt per example task and show held-out accuracy side by side: zero-shot (the task's
# instruction as plain text, no soft prompt), the untrained prompt (initialised from that text) and the tuned one.
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
declare -A INSTRUCTION=(
  [reviews]="is this review positive or negative"
  [topic]="is this news about sports food or science"
)
for tag in reviews topic; do
  ptcli add-task "$tag" -p "$DIR" --train "$DIR/data/$tag-train.jsonl" --valid "$DIR/data/$tag-valid.jsonl" \
    --init-text "${INSTRUCTION[$tag]}" --lr 0.05 --batch-size 16 --warmup-steps 5 --val-check-interval 20
done

# Zero-shot: each instruction as plain text before the input, in a project of its own (scripts/zero_shot.sh says how).
for tag in reviews topic; do
  bash scripts/zero_shot.sh "$DIR/zero-shot-$tag" default "$tag" "${INSTRUCTION[$tag]}" \
    "$DIR/data/$tag-train.jsonl" "$DIR/data/$tag-valid.jsonl" "$DATA/test.jsonl" > "$DIR/zero-shot-$tag.json"
done

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
zero = {tag: json.load(open(f"{d}/zero-shot-{tag}.json"))["accuracy"][tag] for tag in after}
print(f"\nheld-out accuracy on examples/data/test.jsonl, {secs} s in all")
print(f"{'tag':<10}{'zero-shot':>11}{'untrained':>11}{'tuned':>9}{'n':>6}")
for tag in sorted(after):
    z, b, a = zero[tag]["accuracy"], before[tag]["accuracy"], after[tag]["accuracy"]
    print(f"{tag:<10}{z:>11.3f}{b:>11.3f}{a:>9.3f}{after[tag]['total']:>6}")
PY
