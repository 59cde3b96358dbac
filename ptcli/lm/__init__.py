"""Running the frozen base behind soft prompts.

`source.py` finds a base's files (the default GGUF, a local folder or file, the converted copy) without
torch; `base.py` loads a base (GGUF, local folder, hub id) and fingerprints it; `arch.py` holds the
facts about model families (the sliding-window rule, what ptcli refuses); `batch.py` what
every way of running rows shares (padding, the prompt stack, the head); `forward.py` the
shared-prompt fast paths (training loss, greedy decoding, ranked candidates) and
`placed.py` the same for templates that put prompt vectors among the tokens; `depth.py` where a
prompt enters the stream (block 0, or block K for a late prompt; once, or at every block from
there for a deep one), which every path feeds its prompt vectors through; `frozen.py` runs rows up to a
block (the states below a late prompt) and `above.py` from it (a late prompt's training step). `rules.py`
holds the answer rules, once for everyone and without torch (text budget, ensemble vote, ranked
mean, calibration), and `answers.py` runs the torch base to answer by them. `probe.py` is
`ptcli init`'s check that the fast paths equal a plain forward. It may import data and the root modules, never project.
"""
