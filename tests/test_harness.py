"""lm-evaluation-harness with ptcli's model: offline, on tasks defined over local JSON Lines files.

The harness's accuracy must be `ptcli infer`'s on the same rows; its log-likelihoods are ptcli's
ranked scores, held here to a plain full forward of each row and candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import cli, failed, ok
from clihelp import write_jsonl as _jsonl
from reference import plain_lm_loss

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # tunes, and imports lm_eval
lm_eval = pytest.importorskip("lm_eval")

FAST = ["--warmup-steps", "1", "--max-steps", "2", "--val-check-interval", "2", "--batch-size", "4"]
FAST += ["--max-seq-length", "64", "-q"]
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "lovely", "grim"]
ROWS = [
    {"prompt_tag": "sent", "text": f"the film was {w} {i}", "answer": "positive" if j % 2 == 0 else "negative"}
    for i in range(2)
    for j, w in enumerate(WORDS)
]
TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{answer}}}}"
{extra}
metric_list:
  - metric: {metric}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("harness")
    root = d / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    for tag, extra in (("sent", ["--ensemble", "2"]), ("topic", ["--template", "suffix"])):
        rows = [{**r, "prompt_tag": tag} for r in ROWS]
        train, valid = _jsonl(d / f"{tag}-train.jsonl", rows), _jsonl(d / f"{tag}-valid.jsonl", rows[:4])
        ok(cli("tune", "--tag", tag, "--train", train, "--valid", valid, *FAST, *extra, "-p", root))
    return root


@pytest.fixture(scope="module")
def tasks(project: Path) -> Path:
    """Two task YAMLs over one local file: multiple choice and greedy generation."""
    d = project.parent / "tasks"
    d.mkdir()
    data = _jsonl(project.parent / "rows.jsonl", ROWS)
    (d / "mc.yaml").write_text(
        TASK.format(
            name="ptcli_mc",
            data=data,
            kind="multiple_choice",
            metric="acc",
            extra='doc_to_choice: ["positive", "negative"]',
        )
    )
    until = 'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false'
    (d / "gen.yaml").write_text(
        TASK.format(name="ptcli_gen", data=data, kind="generate_until", metric="exact_match", extra=until)
    )
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _predictions(project: Path, tag: str, *flags: str) -> list[str]:
    path = _jsonl(project.parent / "infer.jsonl", [{**r, "prompt_tag": tag} for r in ROWS])
    result = cli("infer", path, "-p", project, "-q", *flags)
    ok(result)
    return [json.loads(line)["prediction"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize("tag", ["sent", "topic"])  # an ensemble; a prompt after the text
def test_eval_accuracy_equals_infer_rank(project: Path, tasks: Path, tag: str) -> None:
    result = cli("eval", "--tag", tag, "--tasks", "ptcli_mc", "--include-path", tasks, "--json", "-p", project, "-q")
    ok(result)
    got = json.loads(result.stdout)
    predictions = _predictions(project, tag, "--mode", "rank", "--choices", "positive,negative")
    want = sum(p == r["answer"] for p, r in zip(predictions, ROWS)) / len(ROWS)
    assert got["results"]["ptcli_mc"]["acc,none"] == pytest.approx(want, abs=1e-9)
    assert got["n_samples"]["ptcli_mc"]["effective"] == len(ROWS) and got["tag"] == tag


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_are_ptclis_ranked_scores(project: Path) -> None:
    from ptcli.data.encode import answer_tokens
    from ptcli.enums import Mode
    from ptcli.evaluation.harness import PtcliLM
    from ptcli.inference.engine import Item

    lm = PtcliLM(str(project), tag="sent", batch_size=3)
    texts = [r["text"] for r in ROWS[:5]]
    pairs = [(t, c) for t in texts for c in (" positive", " negative")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    model, tok, members = lm.engine.model, lm.engine.tok, lm.prompt.members  # (K, P, H)
    for (text, cont), (score, greedy) in zip(pairs, got):
        (seq,) = lm.engine.rows([Item(lm.prompt, text, Mode.RANK, 0, ("positive", "negative"))])
        (cand,) = answer_tokens(tok, [cont.strip()])
        sums = [
            -plain_lm_loss(model, m, [seq + cand], [[-100] * len(seq) + cand], tok.pad_token_id)[0] for m in members
        ]
        assert score == pytest.approx(float(torch.stack(sums).mean()), abs=1e-4)  # the members' mean, in full
        said = lm.engine([Item(lm.prompt, text, Mode.GENERATE, len(cand))])[0]
        assert greedy == (said.text == cont.strip())
    ranked = _predictions(project, "sent", "--mode", "rank", "--choices", "positive,negative")
    for i in range(len(texts)):
        pos, neg = got[2 * i][0], got[2 * i + 1][0]
        assert ("positive" if pos >= neg else "negative") == ranked[i]


def test_generate_until_answers_as_infer_does(project: Path) -> None:
    from ptcli.evaluation.harness import PtcliLM

    lm = PtcliLM(str(project), tag="topic")
    reqs = [(r["text"], {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}) for r in ROWS]
    want = [p.split("\n")[0] for p in _predictions(project, "topic", "--mode", "generate", "--tokens-to-generate", 5)]
    assert lm.generate_until(_instances("generate_until", reqs)) == want
    stops = {p[1:3] for p in want if len(p) > 3}
    cut = lm.generate_until(
        _instances("generate_until", [(r["text"], {"until": sorted(stops), "max_gen_toks": 5}) for r in ROWS])
    )
    assert all(c == w[: min((w.find(s) for s in stops if s in w), default=len(w))] for c, w in zip(cut, want))


def test_the_harness_registry_knows_ptcli(project: Path, tasks: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import ptcli.evaluation.harness  # noqa: F401  (registers the model)

    out = simple_evaluate(
        model="ptcli",
        model_args=f"project={project},tag=topic",
        tasks=["ptcli_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    want = [p.split("\n")[0] for p in _predictions(project, "topic", "--mode", "generate", "--tokens-to-generate", 4)]
    samples = sorted(out["samples"]["ptcli_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == want
    exact = sum(w == r["answer"] for w, r in zip(want, ROWS)) / len(ROWS)
    assert out["results"]["ptcli_gen"]["exact_match,none"] == pytest.approx(exact)


def test_refusals(project: Path, tasks: Path) -> None:
    from ptcli.errors import UsageError
    from ptcli.evaluation.harness import PtcliLM

    err = failed(cli("eval", "--tag", "sent", "--tasks", "no_such_task", "--include-path", tasks, "-p", project), 2)
    assert "'no_such_task'" in err and "--include-path" in err
    err = failed(cli("eval", "--tag", "ghost", "--tasks", "ptcli_mc", "--include-path", tasks, "-p", project), 1)
    assert "ghost" in err and "sent" in err
    lm = PtcliLM(str(project), tag="sent")
    with pytest.raises(UsageError, match="greedily"):
        lm.generate_until(_instances("generate_until", [("x", {"do_sample": True})]))
    with pytest.raises(UsageError, match="rolling"):
        lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [("x",)]))


def test_a_missing_harness_is_exit_2_with_the_extra(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them raises ImportError, as when not installed
    monkeypatch.delitem(sys.modules, "ptcli.evaluation.harness", raising=False)
    err = failed(cli("eval", "--tag", "sent", "--tasks", "x", "-p", project), 2)
    assert "`ptcli eval` needs the lmeval extra (lm_eval is not installed)" in err
    assert "pip install 'ptcli[lmeval]'" in err
