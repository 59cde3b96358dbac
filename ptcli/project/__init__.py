"""The files of a project directory, and nothing that needs torch at import time.

`manifest.py` is `ptcli.json` (the base it was made for, the prompt length, recorded tasks);
`bank.py` the prompt bank (`bank/TAG.safetensors`), `record.py` what a prompt says about
itself; `sealed.py` the checksummed safetensors format both prompts and checkpoints use;
`runs.py` the run directories (checkpoint records, metrics logs, the run history);
`storage.py` atomic writes and the project lock. `manage.py`, `peft_adapter.py` and
`trtllm.py` (a TensorRT-LLM prompt table of several tags; its README in `trtllm_readme.py`)
move whole tags (remove, rename, export, import); `check.py` verifies a project, `report.py`
reads what `ptcli show` shows. It may import lm (lazily, for the few calls that need a
base), data and the root modules.
"""
