"""ptcli as a model of EleutherAI's lm-evaluation-harness (`harness.py`): a tag of a project answers the
harness's requests by ptcli's own paths, `ptcli eval` runs the harness with it.

It stands beside serving/, another face over a loaded base: it may import api, inference and every
folder below, and lm_eval is imported only here (the `lmeval` extra).
"""
