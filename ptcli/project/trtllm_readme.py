"""The README.md of a TensorRT-LLM export folder (trtllm.py): how a request names its task, for its tags.

Written from the folder's task map, so the commands it shows name the folder's own task ids, prompt lengths
and table size. No torch, no numpy.
"""

from __future__ import annotations

from typing import Any

_README = """\
# TensorRT-LLM prompt table from ptcli

Made by `ptcli export --format trtllm` ({made_by}) for the base `{ref}` (hidden size {H}).
ptcli did not run it on TensorRT-LLM: it follows TensorRT-LLM's documented p-tuning inputs
(`examples/run.py --prompt_table_path/--prompt_tasks`, the executor API's `PromptTuningConfig`)
and the table NeMo's `examples/gpt/nemo_prompt_convert.py` writes.

`{table}` is ({T}, {P}, {H}) {dtype}: task t's {P} virtual-token vectors are block t.

| task id | tag | prompt length |
| --- | --- | --- |
{rows}

Build the engine with room for every task's vectors:

    trtllm-build --checkpoint_dir CHECKPOINT --output_dir ENGINE --max_prompt_embedding_table_size {size}

A request names its task by its task id and carries {P} virtual tokens before its text: ids
VOCAB + i for i = 0..{last}, where VOCAB is the engine's vocab_size (the base's config.json
`vocab_size`), then the text's tokens without special tokens (ptcli reads a row that way: no BOS):

    ids = [VOCAB + i for i in range({P})] + tokenizer(text, add_special_tokens=False).input_ids

With `examples/run.py`, one task id and one prompt length per input text:

    python3 examples/run.py --engine_dir ENGINE --tokenizer_dir BASE --prompt_table_path {table} \\
        --prompt_tasks {ids} --num_prepend_vtokens {lengths} --input_text {texts} \\
        --no_add_special_tokens --no_prompt_template --max_output_len 32

With the executor API, a request of task t takes `PromptTuningConfig(embedding_table=table[t])`. Against
the whole table flattened to ({size}, {H}) (one request's embedding table, or task id 0), task t's vector i
is id VOCAB + t*{P} + i.
ptcli cuts a long text from the left so that prompt, text and answer fit the tag's max sequence length;
TensorRT-LLM does not know that budget. `{map}` holds this map and each tag's ptcli record
(`ptcli import --format trtllm DIR` reads the folder back).
"""


def readme(meta: dict[str, Any], table: str, map_name: str) -> str:
    """The folder's README.md: how a request names its task, for these tags."""
    tasks, (T, P, H) = meta["tasks"], meta["shape"]
    return _README.format(
        made_by=meta["made_by"],
        ref=meta["base"]["ref"],
        table=table,
        map=map_name,
        T=T,
        P=P,
        H=H,
        last=P - 1,
        dtype=meta["dtype"],
        size=meta["max_prompt_embedding_table_size"],
        rows="\n".join(f"| {t['task_id']} | {tag} | {t['prompt_length']} |" for tag, t in tasks.items()),
        ids=",".join(str(t["task_id"]) for t in tasks.values()),
        lengths=" ".join(str(t["prompt_length"]) for t in tasks.values()),
        texts=" ".join(f'"a {tag} text"' for tag in tasks),
    )
