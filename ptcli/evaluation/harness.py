"""lm-evaluation-harness's model `ptcli`: one tag of a project answers the harness's requests.

- `loglikelihood`: requests that share a context are one ranked row (`--mode rank`) whose
  answer set is their continuations, stripped as `--choices` are. The log-likelihood returned
  is ptcli's ranked score of a candidate: its tokens as training saw them (the answer prefix
  and end-of-sequence included), the mean over an ensemble's members, calibrated when asked.
  So the harness's argmax over a document's choices is `ptcli infer --mode rank`'s answer.
  `is_greedy` says whether the greedy answer (`--mode generate`) is the continuation itself.
- `generate_until`: one greedy answer per request, as `ptcli infer --mode generate`, cut at
  the first `until` string; up to `max_gen_toks` tokens. Sampling is refused: ptcli decodes greedily.
- `loglikelihood_rolling` (perplexity tasks) is refused: a tag's prompt answers rows, it does not
  score free text.

Importing this module registers the model with lm_eval's registry, so after `import
ptcli.evaluation.harness`, `lm_eval.simple_evaluate(model="ptcli", model_args="project=DIR,tag=T")`
works; `ptcli eval` does it for the command line (the `lm_eval` command finds no models outside
its own package).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ptcli import dist
from ptcli.config import BaseOptions
from ptcli.enums import Backend, LlamaWeights, Mode
from ptcli.errors import UsageError
from ptcli.inference.engine import Item, Prediction, Prompt
from ptcli.inference.infer import open_engine, plan
from ptcli.lm.rules import room
from ptcli.project import bank
from ptcli.project import manifest as proj


@register_model("ptcli")
class PtcliLM(LM):
    """The harness's LM over `project`'s `tag` (model_args: project, tag, batch_size, engine, llama_weights,
    calibrate)."""

    def __init__(
        self,
        project: str | Path = ".",
        tag: str | None = None,
        batch_size: int | str = 16,
        engine: str = "torch",
        calibrate: bool | str = False,
        llama_weights: str = "file",
        status: Callable[[str], None] = lambda _: None,
        **harness: Any,  # what the harness adds for every model (device, max_batch_size): ptcli places its own base
    ):
        super().__init__()
        if not tag:
            raise UsageError("the ptcli model needs a tag: model_args=project=DIR,tag=TAG")
        if str(batch_size).startswith("auto"):
            raise UsageError("batch_size 'auto' is not supported by ptcli: give a number of rows")
        directory = proj.load(Path(project))
        self.batch_size = int(batch_size)
        self.calibrated = str(calibrate).lower() in ("true", "1", "yes")
        self.prompt = Prompt.of(tag, *bank.get(directory, tag))
        _, world, device = dist.join_group()
        base = BaseOptions(engine=Backend(engine), llama_weights=LlamaWeights(llama_weights))
        self.engine = open_engine(directory, base, world, device, status)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont.strip()) for ctx, cont in (r.args for r in requests)]
        if any(not cont for _, cont in pairs):
            raise UsageError("a continuation is empty once stripped: ptcli ranks answers, and an empty one has none")
        sets: dict[str, list[str]] = {}  # context -> its continuations, in first-seen order
        for ctx, cont in pairs:
            if cont not in sets.setdefault(ctx, []):
                sets[ctx].append(cont)
        contexts = list(sets)
        ranked = [Item(self.prompt, c, Mode.RANK, 0, tuple(sets[c]), self.calibrated) for c in contexts]
        longest: dict[tuple[str, ...], int] = {}  # answer set -> its longest candidate with eos: room to stop
        for it in ranked:
            if it.choices not in longest:  # tokenized once per answer set, not once per context
                longest[it.choices] = room(self.engine.tok, Mode.RANK, 0, it.choices)
        greedy = [Item(self.prompt, it.text, Mode.GENERATE, longest[it.choices]) for it in ranked]
        answers = self._answer(ranked + greedy)
        scores = {c: dict(zip(sets[c], a.scores)) for c, a in zip(contexts, answers)}
        said = {c: a.text for c, a in zip(contexts, answers[len(contexts) :])}
        return [(scores[ctx][cont], said[ctx] == cont) for ctx, cont in pairs]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items, untils = [], []
        for ctx, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise UsageError("ptcli answers greedily: the task asks for sampling (do_sample / temperature > 0)")
            until = kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            items.append(Item(self.prompt, ctx, Mode.GENERATE, int(kwargs.get("max_gen_toks", 256))))
        return [_cut(a.text, u) for a, u in zip(self._answer(items), untils)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise UsageError(
            "ptcli does not score rolling log-likelihoods (perplexity tasks): a tag's prompt answers rows",
            hint="evaluate tasks whose output_type is multiple_choice, loglikelihood or generate_until",
        )

    def _answer(self, items: list[Item]) -> list[Prediction]:
        """Answers in item order, batched as `ptcli infer` batches (rows of one pass, sorted by length)."""
        laid = self.engine.laid_out(items)
        out: dict[int, Prediction] = {}
        for idx in plan(self.engine, items, laid, self.batch_size):
            out.update(zip(idx, self.engine.run([items[i] for i in idx], [laid[i] for i in idx])))
        return [out[i] for i in range(len(items))]


def _cut(text: str, until: list[str]) -> str:
    at = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=-1)
    return text[:at] if at >= 0 else text


def evaluate(
    directory: proj.ProjectDir,
    tag: str,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    base: BaseOptions = BaseOptions(),
    calibrate: bool = False,
    status: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """lm-eval's scores of `tag` on `tasks` (the harness's own, or YAML files under `include_path`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):  # the harness's own ~10k YAMLs: indexed if needed
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))}",
            hint="give the folder of your task's YAML with --include-path, or a task of the harness's own",
        )
    model = PtcliLM(directory.root, tag, batch_size, base.engine.value, calibrate, base.llama_weights.value, status)
    status(f"evaluating {tag!r} on {', '.join(tasks)} with lm-evaluation-harness {lm_eval.__version__}")
    out = lm_eval.simple_evaluate(
        model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )
    assert out is not None  # None only on the processes of a multi-process run other than the first
    return {"tag": tag, "results": out["results"], "n_samples": out["n-samples"], "n_shot": out["n-shot"]}
