"""A tuning run, read top to bottom: `tune.py` (preconditions, data, the base, results) runs
`recipe.py` (setup, validate, step, train, save: torchtune's recipe shape).

`objective.py` is what a run minimises and keeps prompts by (tune's answers); `distill.py` runs
`ptcli distill` through the same recipe with a teacher's distributions (`teacher.py`) as its objective.
`soft_prompt.py` holds the trainable prompt (its init and reparameterization); `loss.py` a
step's loss (the answer's, or over the answer set); `states.py` a late prompt's kept frozen states;
`batches.py` the stateless data order that makes resume exact; `validate.py` the per-tag
validation that keeps the best prompt; `checkpoint.py` saving and restoring a run's state.
A flag of `tune` is a field of `config.TaskConfig`; the CLI option is derived from it in
`cli/options.py`. It may import project, lm, data and the root modules; not inference
(validation answers by `lm.rules`, through `lm.answers`, as inference does).
"""
