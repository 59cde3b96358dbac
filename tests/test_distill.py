"""`ptcli distill`: the teacher's answers and the student's KL against full unpadded forwards, resume, bad input.

The reference here reads the teacher text as *tokens*, [text tokens][row] (the base as a user runs
it with the long prompt), and the student as [soft prompt][row] embeddings; one row at a time, no
padding, logits everywhere. The family matrix is test_families.py's (fast loop: llama, gpt2 and
mistral with a window of 8, narrower than every row here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import cli, failed, ok, write_jsonl
from conftest import make_tokenizer
from test_families import FAST, TEXTS, family  # noqa: F401 (family: a fixture)
from test_train import Reporter

from ptcli.api import Project, init_project
from ptcli.data.template import Layout
from ptcli.errors import ProjectError
from ptcli.project import bank, runs
from ptcli.project import manifest as proj
from ptcli.tuning.teacher import ask, kl, said_logprobs, teacher_ids, teacher_prompt, topk

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEACHER = "answer with one word . i love it positive . i hate it negative ."
MAX_NEW = 3


def _logits(model, embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds[None]).logits[0].float()  # (T, V)


def _reference(model, tok, template: str, prompt: torch.Tensor, max_new: int):
    """Per row: the teacher's greedy targets read as tokens, and its and the student's log-probs (n, V) there."""
    t_ids = teacher_ids(tok, TEACHER)
    student, teacher = Layout(tok, template, prompt.shape[0]), Layout(tok, template, len(t_ids))
    table = model.get_input_embeddings()
    out = []
    for text in tok(TEXTS, add_special_tokens=False).input_ids:
        t_row = teacher.context(text)
        t_row = t_ids + t_row if teacher.prefix else [t_ids[-t - 1] if t < 0 else t for t in t_row]  # the text, typed
        targets: list[int] = []
        for _ in range(max_new):  # greedy, one full forward a token
            nxt = int(_logits(model, table(torch.tensor(t_row + targets)))[-1].argmax())
            targets.append(nxt)
            if nxt == tok.eos_token_id:
                break
        n = len(targets)
        t_logp = _logits(model, table(torch.tensor(t_row + targets)))[-n - 1 : -1].log_softmax(-1)  # (n, V)
        s_row = student.context(text)
        s_row = [-(j + 1) for j in range(prompt.shape[0])] + s_row if student.prefix else s_row
        ids = torch.tensor([max(t, 0) for t in s_row + targets])
        slots = torch.tensor([t < 0 for t in s_row + targets])
        vectors = torch.stack([prompt[-t - 1] if t < 0 else torch.zeros(prompt.shape[1]) for t in s_row + targets])
        embeds = torch.where(slots.unsqueeze(-1), vectors, table(ids))  # (T, H)
        s_logp = _logits(model, embeds)[-n - 1 : -1].log_softmax(-1)  # (n, V)
        out.append((targets, t_logp, s_logp))
    return out


def _ours(model, tok, template: str, prompt: torch.Tensor, max_new: int, k: int):
    t_ids = teacher_ids(tok, TEACHER)
    student, teacher = Layout(tok, template, prompt.shape[0]), Layout(tok, template, len(t_ids))
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    said = ask(model, tok, teacher_prompt(model, t_ids), [teacher.context(t) for t in texts], max_new, k, 3)
    logp = said_logprobs(model, prompt, [student.context(t) for t in texts], [s.targets for s in said], 0)
    ids = None if said[0].ids is None else torch.cat([s.ids for s in said])  # type: ignore[misc]
    top, rest = torch.cat([s.logp for s in said]), torch.cat([s.rest for s in said])
    return said, kl(logp, ids, top, rest)


@pytest.mark.parametrize("template", ["prefix", "{text} answer :{prompt}{answer}"])
@pytest.mark.parametrize("k", [0, 5])
def test_kl_and_gradient_equal_full_forwards(family, template: str, k: int) -> None:
    """The teacher's answers and distributions, and the student's KL (whole vocabulary, and top 5 plus the rest),
    with its gradient, equal full forwards of the teacher text as tokens and of the student's vectors."""
    name, _, model, tok = family
    P = 4
    H = model.get_input_embeddings().weight.shape[1]
    start = torch.randn(P, H, generator=torch.Generator().manual_seed(1)) * 3  # far from the teacher
    ref_prompt = start.clone().requires_grad_()
    ref = _reference(model, tok, template, ref_prompt, MAX_NEW)
    ref_kl = []
    for _, t_logp, s_logp in ref:
        if k:
            ids, top, rest = topk(t_logp.detach(), k)
            assert ids is not None
            q = s_logp.gather(1, ids)
            q_rest = torch.log1p(-q.exp().sum(1).clamp(max=1 - 1e-7))  # the plain way: 1 - the kept mass
            ref_kl.append((top.exp() * (top - q)).sum(1) + rest.exp() * (rest - q_rest))
        else:
            ref_kl.append((t_logp.exp() * (t_logp - s_logp)).sum(1))
    ref_loss = torch.cat(ref_kl)
    ref_loss.sum().backward()

    prompt = start.clone().requires_grad_()
    said, ours = _ours(model, tok, template, prompt, MAX_NEW, k)
    assert [s.targets for s in said] == [r[0] for r in ref]
    ours.sum().backward()
    torch.testing.assert_close(ours, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt.grad, ref_prompt.grad, atol=1e-5, rtol=1e-4)
    if name in FAST:  # a random student is not the teacher: the comparison is not of zeros (some tiny families barely
        assert float(ours.detach().sum()) > 1e-3  # react to their input: there the KLs are ~1e-5)


def test_a_student_that_is_the_teacher_text_has_kl_zero(family) -> None:
    _, _, model, tok = family
    prompt = teacher_prompt(model, teacher_ids(tok, TEACHER))
    for k in (0, 5):
        _, per = _ours(model, tok, "prefix", prompt, MAX_NEW, k)
        assert float(per.abs().max()) < 1e-5


def test_a_sampling_teacher_answers_reproducibly_and_keeps_its_distributions(family) -> None:
    """--temperature: the same seed gives the same answers, a cold teacher is the greedy one, and the kept
    distributions are the teacher's own along the sampled answers (a student that is the teacher: KL 0)."""
    name, _, model, tok = family
    t_ids = teacher_ids(tok, TEACHER)
    teacher, prompt = Layout(tok, "prefix", len(t_ids)), teacher_prompt(model, t_ids)
    contexts = [teacher.context(t) for t in tok(TEXTS * 3, add_special_tokens=False).input_ids]

    def answers(temperature: float, seed: int) -> list[list[int]]:
        return [s.targets for s in ask(model, tok, prompt, contexts, 4, 0, 3, temperature, seed)]

    greedy = answers(0.0, 0)
    assert answers(1.0, 7) == answers(1.0, 7) and answers(1e-6, 7) == greedy
    if name in FAST:  # families that react to their input (see above): a hot teacher says other things
        assert answers(3.0, 7) != greedy and answers(3.0, 7) != answers(3.0, 8)
    said = ask(model, tok, prompt, contexts, 4, 5, 3, 3.0, 7)
    logp = said_logprobs(model, prompt, contexts, [s.targets for s in said], 0)  # the teacher as its own student
    ids = torch.cat([s.ids for s in said if s.ids is not None])
    per = kl(logp, ids, torch.cat([s.logp for s in said]), torch.cat([s.rest for s in said]))
    assert float(per.abs().max()) < 1e-5


# ---------------------------------------------------------------- the command, end to end


def _rows(n: int, tag: str = "sent") -> list[dict]:
    words = ["love", "hate", "like", "dislike", "adore", "loathe"]
    things = ["it", "this", "the food", "the phone", "the movie"]
    return [{"prompt_tag": tag, "text": f"i {words[i % 6]} {things[i % 5]}"} for i in range(n)]


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path, tiny_tokenizer_json: str):
    """A project whose prompt length is the teacher text's token count, and 30 unlabelled inputs."""
    root = tmp_path_factory.mktemp("distill")
    n = len(teacher_ids(make_tokenizer(tiny_tokenizer_json), TEACHER))
    init_project(root / "p", str(lively_llama), n)
    write_jsonl(root / "inputs.jsonl", _rows(30))
    (root / "teacher.txt").write_text(TEACHER, encoding="utf-8")
    return root


ARGS = ["--max-new-tokens", MAX_NEW, "--batch-size", 4, "--lr", 0.05, "--warmup-steps", 1, "--seed", 3]


def test_distill_starts_as_the_teacher_and_writes_an_ordinary_prompt(setup_dir: Path, tmp_path: Path) -> None:
    """A student started from the teacher text, as long as it, agrees with the teacher at step 0 (KL 0); the run
    writes a bank entry that says it was distilled, and infer, show and list-tags read it as any other."""
    root = Path(shutil.copytree(setup_dir, tmp_path / "d"))
    result = cli(
        "distill",
        "--tag",
        "sent",
        "--from-file",
        root / "teacher.txt",
        "--inputs",
        root / "inputs.jsonl",
        *ARGS,
        "--max-steps",
        4,
        "--val-check-interval",
        2,
        "-p",
        root / "p",
        "--json",
    )
    ok(result)
    out = json.loads(result.stdout)
    assert out["initial_metrics"]["val_acc"] == 1.0 and out["initial_metrics"]["val_loss"] < 1e-6
    assert out["steps"] == 4 and "distilled 'sent': val_acc 1.000 ->" in result.stderr
    p = proj.load(root / "p")
    _, meta = bank.get(p, "sent")
    d = meta.distilled
    assert d is not None and meta.init_text is None and TEACHER not in json.dumps(meta.to_json())
    assert d["teacher_tokens"] == p.num_prompt_tokens and d["tokens_saved_per_row"] == 0
    assert d["max_new_tokens"] == MAX_NEW and len(d["teacher_sha256"]) == 64
    assert meta.inputs is not None and meta.inputs["teacher sha256"] == d["teacher_sha256"]
    ok(listed := cli("list-tags", "-p", root / "p", "--json"))
    assert [t["tag"] for t in json.loads(listed.stdout)] == ["sent"]
    ok(cli("show", "sent", "-p", root / "p"))
    ok(answered := cli("infer", root / "inputs.jsonl", "-p", root / "p", "--tokens-to-generate", MAX_NEW))
    assert len(answered.stdout.splitlines()) == 30
    # --auto-resume of the finished run finds it in the bank: nothing to do
    ok(
        again := cli(
            "distill",
            "--tag",
            "sent",
            "--from-file",
            root / "teacher.txt",
            "--inputs",
            root / "inputs.jsonl",
            *ARGS,
            "--max-steps",
            4,
            "--val-check-interval",
            2,
            "-p",
            root / "p",
            "--auto-resume",
        )
    )
    assert "already distilled" in again.stderr
    args = ["--from-file", root / "teacher.txt", "--inputs", root / "inputs.jsonl", *ARGS, "-p", root / "p"]
    assert "tag 'sent' already has a prompt in the bank" in failed(cli("distill", "--tag", "sent", *args), 1)


def test_distill_learns_a_shorter_prompt(setup_dir: Path, tmp_path: Path, lively_llama: Path) -> None:
    """Two vectors, started from the text's first two tokens, move towards the teacher: the KL falls."""
    root = tmp_path / "short"
    init_project(root, str(lively_llama), 2)
    rep = Reporter()
    result = Project.open(root).distill(
        "sent",
        TEACHER,
        setup_dir / "inputs.jsonl",
        max_new_tokens=MAX_NEW,
        reporter=rep,
        max_steps=12,
        val_check_interval=4,
        batch_size=4,
        lr=0.05,
        warmup_steps=1,
    )
    assert rep.evaluations == [0, 4, 8, 12]
    assert result.metrics["val_loss"] < result.initial_metrics["val_loss"]
    _, meta = bank.get(proj.load(root), "sent")
    assert meta.distilled is not None and meta.distilled["tokens_saved_per_row"] == meta.distilled["teacher_tokens"] - 2


def test_resume_reaches_the_uninterrupted_prompt(setup_dir: Path, tmp_path: Path, lively_llama: Path) -> None:
    runs_of = {}
    for name, stop in (("full", None), ("cut", 5)):
        root = tmp_path / name
        init_project(root, str(lively_llama), 2)
        opts = dict(max_new_tokens=MAX_NEW, max_steps=6, val_check_interval=2, batch_size=4, lr=0.05, warmup_steps=1)
        if stop:
            with pytest.raises(KeyboardInterrupt):
                Project.open(root).distill("sent", TEACHER, setup_dir / "inputs.jsonl", reporter=Reporter(stop), **opts)
            assert bank.tags(proj.load(root)) == [] and runs.checkpoint_path(proj.load(root), "sent").exists()
            with pytest.raises(ProjectError, match="other settings"):
                Project.open(root).distill("sent", TEACHER + " more", setup_dir / "inputs.jsonl", resume=True, **opts)
            rep = Reporter()
            result = Project.open(root).distill(
                "sent", TEACHER, setup_dir / "inputs.jsonl", reporter=rep, resume=True, **opts
            )
            assert rep.started == (6, 4) and rep.steps == [5, 6]
        else:
            result = Project.open(root).distill("sent", TEACHER, setup_dir / "inputs.jsonl", **opts)
        runs_of[name] = (result, bank.get(proj.load(root), "sent")[0])
    (full, want), (cut, got) = runs_of["full"], runs_of["cut"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert cut.metrics == pytest.approx(full.metrics, abs=1e-6) and cut.best_step == full.best_step


def test_bad_input_is_refused_by_file_and_line(setup_dir: Path, tmp_path: Path) -> None:
    p, teacher = setup_dir / "p", ["--from-text", TEACHER]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_rows(1)[0]) + "\n{not json\n" + json.dumps({"prompt_tag": "other", "text": "x"}))
    err = failed(cli("distill", "--tag", "sent", *teacher, "--inputs", broken, "-p", p), 2)
    assert f"{broken}:2: invalid JSON" in err
    other = write_jsonl(tmp_path / "other.jsonl", _rows(3) + _rows(1, tag="news"))
    err = failed(cli("distill", "--tag", "sent", *teacher, "--inputs", other, "-p", p), 2)
    assert f"{other}:4: prompt_tag 'news' is not the tag being distilled ('sent')" in err
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"prompt_tag": "sent"}])
    assert f"{no_text}:1: missing field 'text'" in failed(
        cli("distill", "--tag", "sent", *teacher, "--inputs", no_text, "-p", p), 2
    )
    inputs = setup_dir / "inputs.jsonl"
    both = failed(
        cli(
            "distill", "--tag", "sent", *teacher, "--from-file", setup_dir / "teacher.txt", "--inputs", inputs, "-p", p
        ),
        2,
    )
    assert "exactly one of --from-text and --from-file" in both
    assert "the teacher text is empty" in failed(
        cli("distill", "--tag", "sent", "--from-text", " ", "--inputs", inputs, "-p", p), 2
    )
    slots = failed(
        cli(
            "distill",
            "--tag",
            "sent",
            *teacher,
            "--inputs",
            inputs,
            "--template",
            "{prompt:2}{text}{prompt}{answer}",
            "-p",
            p,
        ),
        2,
    )
    assert "several prompt slots" in slots
    assert bank.tags(proj.load(p)) == []


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_processes_reach_the_one_process_prompt(setup_dir: Path, tmp_path: Path) -> None:
    """Data parallel through torchrun (gloo): every process asks the teacher, each trains on its share."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = [
        "distill",
        "--tag",
        "sent",
        "--from-file",
        setup_dir / "teacher.txt",
        "--inputs",
        setup_dir / "inputs.jsonl",
        *ARGS,
        "--max-steps",
        4,
        "--val-check-interval",
        2,
        "--batch-size",
        8,
        "-q",
    ]
    single, double = (Path(shutil.copytree(setup_dir / "p", tmp_path / name)) for name in ("one", "two"))
    ok(cli(*args, "-p", single))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ptcli"]
    proc = subprocess.run(
        [*cmd, *map(str, args), "-p", str(double), "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"tag": "sent"') == 1  # only the main process reports (and writes)
    a, b = (load_file(p / "bank" / "sent.safetensors")["prompt"] for p in (single, double))
    assert (a - b).abs().max().item() < 1e-5
    _, meta = bank.get(proj.load(double), "sent")
    assert meta.world_size == 2 and meta.distilled is not None


def test_a_sampling_teacher_is_recorded_and_validated_greedily(setup_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(setup_dir, tmp_path / "d"))
    args = ["distill", "--tag", "sent", "--from-file", root / "teacher.txt", "--inputs", root / "inputs.jsonl", *ARGS]
    args += ["--max-steps", 2, "--val-check-interval", 2, "-p", root / "p"]
    err = failed(cli(*args, "--temperature", -1), 2)
    assert "--temperature must be 0 (greedy) or more, got -1" in err
    ok(result := cli(*args, "--temperature", 1.5, "--json"))
    out = json.loads(result.stdout)
    assert out["initial_metrics"]["val_acc"] == 1.0  # held-out rows: the greedy teacher, which the student is
    _, meta = bank.get(proj.load(root / "p"), "sent")
    assert meta.distilled is not None and meta.distilled["temperature"] == 1.5
    assert meta.inputs is not None and meta.inputs["temperature"] == 1.5  # a resume at another one is refused
    ok(shown := cli("show", "sent", "-p", root / "p"))
    assert "sampled at temperature 1.5" in shown.stderr
