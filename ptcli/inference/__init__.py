"""Answers for rows of any tags: `ptcli infer`, `Project.infer` and the server all come here.

`engine.py` answers one mixed-tag batch (every prompt of the batch stacked, each row
pointing at its members; one pass per mode, generation length and prompt placement);
`infer.py` reads a file or rows, plans the batches, runs them through the engine (split over
processes under torchrun) and scores accuracy; `embeds.py` lays the same rows out as the
input embeddings another engine reads (vLLM's `prompt_embeds`, for `ptcli embed`);
`llamacpp.py` and `llama_context.py` are `--engine llama.cpp`, which with `tokenizer.py` (the
base's tokenizer.json read without transformers) and numpy prompts imports no torch. The answer
rules themselves (text budget, ensemble vote, ranked mean, calibration) live in `lm.rules`,
so tuning's validation and both engines use them. It may import project, lm, data and the root modules; not tuning.
"""
