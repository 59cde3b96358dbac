#!/usr/bin/env bash
# Zero-shot accuracy of one tag: its instruction written as plain text before each input, no soft prompt.
#
# usage: scripts/zero_shot.sh DIR BASE TAG INSTRUCTION TRAIN VALID TEST   (the accuracy JSON goes to stdout)
#
# ptcli has no prompt-free mode, and needs none for this: a text-initialised prompt is the embeddings of its
# text's tokens, tiled or clipped to the prompt length. In a project whose prompt length is exactly the
# instruction's token count, that untrained prompt (--max-steps 0) is the instruction itself, token for token,
# so inference there is zero-shot prompting. TRAIN and VALID give the tag's answer set and mode, as for the tuned
# prompt; only TEST's rows of TAG are scored. DIR is created (and replaced).
set -euo pipefail
dir=$1 base=$2 tag=$3 instruction=$4 train=$5 valid=$6 test=$7
n=$(python - "$base" "$instruction" <<'PY'
import sys
from transformers import AutoTokenizer
from ptcli.lm.source import resolve
ref, text = sys.argv[1], sys.argv[2]
print(len(AutoTokenizer.from_pretrained(resolve(ref, lambda _: None)).encode(text, add_special_tokens=False)))
PY
)
rm -rf "$dir"
ptcli init "$dir" --base "$base" --num-prompt-tokens "$n" --quiet
ptcli tune -p "$dir" --tag "$tag" --train "$train" --valid "$valid" --init text --init-text "$instruction" \
  --max-steps 0 --quiet
grep "\"prompt_tag\": \"$tag\"" "$test" > "$dir/test.jsonl"
ptcli infer -p "$dir" "$dir/test.jsonl" --json --quiet --tokens-to-generate 4
