"""Late prompts (--prompt-layer K) and the answer-set loss, against a one-row, unpadded reference.

The reference is written here, apart from ptcli's code: one row at a time, no padding, zero
vectors in the prompt's slots at the input, and a hook on block K that puts the prompt's
vectors in those slots; logits everywhere. The family matrix is test_families.py's (fast loop:
llama, gpt2 and mistral with a window of 8, narrower than every row here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clihelp import cli, failed, ok
from reference import tune
from test_families import (  # noqa: F401 (family: a fixture)
    ANSWERS,
    CHOICES,
    TEXTS,
    WHICH,
    _answer_ids,
    _prompts,
    build,
    family,
)
from test_train import Reporter, small_run

from ptcli.config import TaskConfig
from ptcli.data.template import Layout
from ptcli.enums import Loss
from ptcli.lm.above import hidden_above
from ptcli.lm.batch import to_logits
from ptcli.lm.depth import entering
from ptcli.lm.forward import IGNORE, choice_scores, token_logprobs
from ptcli.lm.frozen import states_below
from ptcli.project import bank
from ptcli.project import manifest as proj
from ptcli.tuning.loss import StepRows, batch_loss
from ptcli.tuning.states import FrozenStates

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, K = 4, 1  # the tiny families have 2 blocks: the prompt enters before the second
ROWS = [(t, "positive" if i % 2 == 0 else "negative") for i, t in enumerate(TEXTS + ["i love it", "i hate it"])]


def logprobs_above(model, *args, **kwargs):
    """above.hidden_above's labelled tokens' log-probabilities (N,) and rows (N,), as training scores them."""
    h, t, row_of = hidden_above(model, *args, **kwargs)
    return -F.cross_entropy(to_logits(model, h).float(), t, reduction="none"), row_of


def _reference_logits(model, prompt: torch.Tensor, ids: list[int], layer: int, depth: int = 1) -> torch.Tensor:
    """Logits (T, V) of one row whose prompt vector j (id -(j+1)) enters before block `layer`; a deep prompt
    (depth D, prompt (D*P, H)) sets its slots again at each of the D-1 blocks after, to rows d*P + j."""
    P = prompt.shape[0] // depth
    x = torch.tensor([max(t, 0) for t in ids])
    slots = torch.tensor([t < 0 for t in ids])  # (T,)

    def vectors(d: int) -> torch.Tensor:  # (T, H): block layer+d's vectors in the slots
        return torch.stack([prompt[d * P - t - 1] if t < 0 else torch.zeros(prompt.shape[-1]) for t in ids])

    embeds = model.get_input_embeddings()(x)  # (T, H)
    embeds = torch.where(slots.unsqueeze(-1), vectors(0) if layer == 0 else 0.0, embeds)
    blocks = next(
        m
        for m in model.base_model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers
    )

    def put(v: torch.Tensor):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = torch.where(slots[None, :, None], v[None].to(h), h)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        return hook

    handles = [
        blocks[layer + d].register_forward_pre_hook(put(vectors(d)), with_kwargs=True)
        for d in range(0 if layer else 1, depth)
    ]
    try:
        return model(inputs_embeds=embeds[None]).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()


def _reference_logprob(model, prompt, ids: list[int], labels: list[int], layer: int, depth: int = 1) -> torch.Tensor:
    logits = _reference_logits(model, prompt, ids, layer, depth)[:-1].log_softmax(-1)  # (T-1, V): t predicts t+1
    keep = [t for t, lab in enumerate(labels[1:]) if lab != IGNORE]
    return logits[keep, [labels[t + 1] for t in keep]].sum()


def _rows(tok, template: str):
    layout = Layout(tok, template, P)
    texts = tok(TEXTS, add_special_tokens=False).input_ids
    rows = [layout.row(t, _answer_ids(tok, a), True) for t, a in zip(texts, ANSWERS)]  # (ids, labels, context)
    if layout.prefix:  # the prefix layout leaves its prompt implicit in front; the reference needs it in place
        slots = [-(j + 1) for j in range(P)]
        whole = [(slots + i, [IGNORE] * P + lab, slots + c) for i, lab, c in rows]
        return rows, whole
    return rows, rows


@pytest.mark.parametrize("template", ["prefix", "suffix"])
def test_late_prompt_loss_and_gradient_equal_the_reference(family, template: str) -> None:
    """Both ways a late prompt runs: the whole base inside `entering` (validation, infer) and the blocks above K
    from their states below it (the training step)."""
    _, _, model, tok = family
    rows, whole = _rows(tok, template)
    ref_prompts = _prompts(model, n=P).requires_grad_()
    ref = torch.stack([_reference_logprob(model, ref_prompts[w], i, lab, K) for w, (i, lab, _) in zip(WHICH, whole)])
    ref.sum().backward()

    prompts = _prompts(model, n=P).requires_grad_()
    with entering(model, K):
        logp, row_of = token_logprobs(model, prompts, [r[0] for r in rows], [r[1] for r in rows], 0, which=WHICH)
    ours = torch.zeros(len(rows)).index_add(0, row_of, logp)  # (B,)
    ours.sum().backward()
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(prompts.grad, ref_prompts.grad, atol=1e-5, rtol=1e-4)

    above = _prompts(model, n=P).requires_grad_()
    seqs, labels = [w[0] for w in whole], [w[1] for w in whole]
    logp, row_of = logprobs_above(model, K, above, states_below(model, K, seqs), seqs, labels, WHICH)
    ours = torch.zeros(len(rows)).index_add(0, row_of, logp)  # (B,)
    ours.sum().backward()
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(above.grad, ref_prompts.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("template", ["prefix", "suffix"])
def test_late_prompt_scores_equal_the_reference(family, template: str) -> None:
    _, _, model, tok = family
    rows, whole = _rows(tok, template)
    prompts, options = _prompts(model, n=P), [_answer_ids(tok, c) for c in CHOICES]
    with torch.no_grad(), entering(model, K):
        ours = choice_scores(model, prompts, [r[2] for r in rows], options, tok.pad_token_id, WHICH)  # (B, C)
    with torch.no_grad():
        ref = torch.tensor(
            [
                [_reference_logprob(model, prompts[w], c + o, [IGNORE] * len(c) + o, K).item() for o in options]
                for w, (_, _, c) in zip(WHICH, whole)
            ]
        )  # (B, C)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_kept_states_give_the_losses_of_recomputed_ones_and_the_choices_loss_is_the_reference(
    family, tmp_path: Path
) -> None:
    _, _, model, tok = family
    _, whole = _rows(tok, "suffix")
    options = [_answer_ids(tok, c) for c in CHOICES]
    rows = StepRows([], [], [], [], [], [])
    for b, (w, (_, _, context)) in enumerate(zip(WHICH, whole)):
        for n, o in enumerate(options):
            rows.seqs.append(context + o)
            rows.labels.append([IGNORE] * len(context) + o)
            rows.which.append(w)
            rows.keys.append(("tag", b, n))  # as step_rows keys them: the text is (tag, row)
            rows.example.append(b)
        rows.gold.append(b % len(options))
    prompts = _prompts(model, n=P)
    with entering(model, K):
        fresh = batch_loss(model, prompts, rows, Loss.CHOICES, 0, None, K)  # the whole base
    states = FrozenStates(model, K, bound=1 << 30)
    first = batch_loss(model, prompts, rows, Loss.CHOICES, 0, states, K)
    again = batch_loss(model, prompts, rows, Loss.CHOICES, 0, states, K)  # every row from the kept states
    assert states.computed == len(rows.seqs) and len(states.kept) == len(rows.seqs)  # once, then never again
    assert len(states.texts) == len(whole)  # one text for all the candidates of a row
    assert fresh[1] == first[1] == again[1] == len(whole)
    assert torch.equal(first[0], again[0])
    torch.testing.assert_close(first[0], fresh[0], atol=1e-5, rtol=1e-6)  # a sum over rows: float32 digits
    with torch.no_grad():
        scores = torch.tensor(
            [
                [_reference_logprob(model, prompts[w], s, lab, K).item() for s, lab in zip(rows.seqs, rows.labels)][
                    b * len(options) : (b + 1) * len(options)
                ]
                for b, w in enumerate(WHICH)
            ]
        )  # (B, C)
    want = F.cross_entropy(scores, torch.tensor(rows.gold), reduction="sum")
    torch.testing.assert_close(fresh[0], want, atol=1e-5, rtol=1e-6)  # a sum over rows: float32 digits

    tight = FrozenStates(model, K, bound=1)  # nothing fits: every row is recomputed, the loss is the same
    assert torch.equal(batch_loss(model, prompts, rows, Loss.CHOICES, 0, tight, K)[0], first[0]) and not tight.kept

    spill = tmp_path / "run" / "frozen-states.0.bin"
    spilled = FrozenStates(model, K, bound=1, spill=spill)  # past the bound, rows go to the run directory
    assert torch.equal(batch_loss(model, prompts, rows, Loss.CHOICES, 0, spilled, K)[0], first[0])
    assert len(spilled.spilled) == len(rows.seqs) and spill.stat().st_size == spilled.spill_bytes > 0
    # read back; the texts' keys and values do not spill, so they run again, in a batch of their own: a family
    # whose experts sum in an order that depends on the batch's shape (gpt_oss) differs in the last float bits
    again_spilled = batch_loss(model, prompts, rows, Loss.CHOICES, 0, spilled, K)[0]
    torch.testing.assert_close(again_spilled, first[0], atol=1e-5, rtol=1e-6)
    assert spilled.computed == len(rows.seqs) + len(whole)
    spilled.close()
    assert not spill.exists()

    (tmp_path / "file").write_text("")
    full = FrozenStates(model, K, bound=1, spill=tmp_path / "file" / "states.bin")  # a spill the disk refuses
    assert torch.equal(batch_loss(model, prompts, rows, Loss.CHOICES, 0, full, K)[0], first[0])
    assert full.refused and not full.spilled


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> tuple[Path, TaskConfig]:
    return small_run(tmp_path_factory.mktemp("late") / "p", lively_llama, ROWS, prompt_layer=1, loss="choices")


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (dict(prompt_layer=1, loss="choices"), "'sent' is a late prompt: it enters before block 1"),
        (dict(deep=True), "'sent' is a deep prompt (vectors for 2 blocks, entered as hidden states)"),
        (dict(deep=True, template="suffix", loss="choices"), "'sent' places its prompt by the template 'suffix'"),
    ],
    ids=["late", "deep", "deep-suffix"],
)
def test_late_and_deep_prompts_resume_exactly_and_infer_reads_how_they_enter(
    settings: dict, refusal: str, lively_llama: Path, tmp_path: Path
) -> None:
    src, cfg = small_run(tmp_path / "src" / "p", lively_llama, ROWS, **settings)
    full = proj.load(Path(shutil.copytree(src, tmp_path / "full")))
    tune(full, "sent", cfg, Reporter())
    full_prompt, meta = bank.get(full, "sent")
    depth = 2 if cfg.deep else 1
    assert meta.best_step > 0 and meta.prompt_layer == cfg.prompt_layer and meta.depth == depth
    assert full_prompt.shape[0] == depth * 4  # (D*P, H)

    cut = proj.load(Path(shutil.copytree(src, tmp_path / "cut")))
    with pytest.raises(KeyboardInterrupt):
        tune(cut, "sent", cfg, Reporter(stop_at=5))
    stale = cut.root / "runs" / "sent" / "frozen-states.0.bin"
    assert not stale.exists()  # an interrupted run's went with it; a killed one's (made here) goes with the next run
    stale.write_bytes(b"left by a killed run")
    tune(proj.load(cut.root), "sent", cfg, Reporter(), resume=True)
    assert not stale.exists() or not cfg.prompt_layer
    prompt, _ = bank.get(proj.load(cut.root), "sent")
    assert torch.allclose(prompt, full_prompt, atol=1e-6, rtol=0)

    rows = [json.loads(line) for line in Path(cfg.valid).read_text().splitlines()]
    result = cli("infer", "-p", full.root, cfg.valid)
    ok(result)
    got = [json.loads(line) for line in result.stdout.splitlines()]
    right = sum(g["prediction"] == r["answer"] for g, r in zip(got, rows)) / len(rows)
    assert right == pytest.approx(meta.metrics["val_acc_rank"])  # infer answers as the kept step's validation
    shown = json.loads(cli("show", "-p", full.root, "sent", "--json").stdout)["record"]
    assert shown["config"]["prompt_layer"] == cfg.prompt_layer and shown.get("depth", 1) == depth
    ok(cli("check", "-p", full.root))
    assert not list(full.root.glob("runs/*/frozen-states.*"))  # the run's kept states went with it
    r = failed(cli("export", "-p", full.root, "sent", tmp_path / "adapter", "--format", "peft"), 2)
    assert refusal in r
    exported = tmp_path / "sent.safetensors"
    ok(cli("export", "-p", full.root, "sent", exported))  # the ptcli format keeps the record, layer and depth
    ok(cli("import", "-p", cut.root, exported, "--tag", "again"))
    again = bank.get(proj.load(cut.root), "again")
    assert (again[1].prompt_layer, again[1].depth) == (cfg.prompt_layer, depth)
    assert torch.equal(again[0], full_prompt)


def test_bad_depth_and_loss_settings_are_refused_by_flag(start, tmp_path: Path) -> None:
    src, cfg = start
    root = Path(shutil.copytree(src, tmp_path / "p"))
    tune_args = ("tune", "-p", root, "--tag", "sent", "--train", cfg.train, "--valid", cfg.valid)
    r = failed(cli(*tune_args, "--prompt-layer", 2), 2)
    assert "--prompt-layer 2 is past the base's last block (it has 2: 0 to 1)" in r
    r = failed(cli(*tune_args, "--prompt-layer", -1), 2)
    assert "--prompt-layer must be 0 or more" in r
    free = root.parent / "free.jsonl"
    free.write_text("".join(json.dumps({"prompt_tag": "sent", "text": t, "answer": t}) + "\n" for t, _ in ROWS))
    r = failed(cli("tune", "-p", root, "--tag", "sent", "--train", free, "--valid", free, "--loss", "choices"), 2)
    assert "--loss choices needs a closed answer set" in r


@pytest.fixture(scope="module", params=["llama", "gpt2", "mistral"])
def three_blocks(request, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_json: str):
    """A family of the matrix with three blocks, so a prompt can enter late and still be deep."""
    layers = {"n_layer": 3} if request.param == "gpt2" else {"num_hidden_layers": 3}
    return build(request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer_json, **layers)


@pytest.mark.parametrize(("layer", "template"), [(0, "prefix"), (0, "suffix"), (1, "prefix"), (1, "suffix")])
def test_deep_prompt_loss_gradient_and_scores_equal_the_reference(three_blocks, layer: int, template: str) -> None:
    """Vectors at every block from `layer` up: the whole base (validation, infer), the blocks above K from kept
    states (training), and ranked scores."""
    model, tok = three_blocks
    depth = 3 - layer
    rows, whole = _rows(tok, template)
    ref_prompts = _prompts(model, n=depth * P).requires_grad_()  # (2, D*P, H)
    ref = torch.stack(
        [_reference_logprob(model, ref_prompts[w], i, lab, layer, depth) for w, (i, lab, _) in zip(WHICH, whole)]
    )
    ref.sum().backward()

    prompts = _prompts(model, n=depth * P).requires_grad_()
    with entering(model, layer, depth):
        logp, row_of = token_logprobs(model, prompts, [r[0] for r in rows], [r[1] for r in rows], 0, which=WHICH)
        with torch.no_grad():
            opts = [_answer_ids(tok, c) for c in CHOICES]
            scores = choice_scores(model, prompts, [r[2] for r in rows], opts, tok.pad_token_id, WHICH)  # (B, C)
    ours = torch.zeros(len(rows)).index_add(0, row_of, logp)  # (B,)
    ours.sum().backward()
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(prompts.grad, ref_prompts.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        want = torch.tensor(
            [
                [_reference_logprob(model, prompts[w], c + o, [IGNORE] * len(c) + o, layer, depth).item() for o in opts]
                for w, (_, _, c) in zip(WHICH, whole)
            ]
        )  # (B, C)
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-6)  # sums of tens: float32's last digits

    if layer:
        above = _prompts(model, n=depth * P).requires_grad_()
        seqs, labels = [w[0] for w in whole], [w[1] for w in whole]
        below = states_below(model, layer, seqs)
        logp, row_of = logprobs_above(model, layer, above, below, seqs, labels, WHICH, depth=depth)
        ours = torch.zeros(len(rows)).index_add(0, row_of, logp)  # (B,)
        ours.sum().backward()
        torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(above.grad, ref_prompts.grad, atol=1e-5, rtol=1e-4)


def test_a_lifted_init_is_the_init_rows_states_after_a_leading_token(three_blocks) -> None:
    """Each block's initial vectors are the init row's states entering it, read after one leading token (the base's
    BOS), as `output_hidden_states` gives them; at block 0 the vectors stay as they are."""
    from ptcli.lm.frozen import lifted

    model, tok = three_blocks
    init = _prompts(model, k=1, n=P)[0]  # (P, H)
    lead = model.get_input_embeddings()(torch.tensor([model.config.bos_token_id]))  # (1, H)
    with torch.no_grad():
        states = model(inputs_embeds=torch.cat([lead, init])[None], output_hidden_states=True).hidden_states
    for layer, depth in ((1, 2), (0, 3), (2, 1)):
        got = lifted(model, layer, init, depth)  # (depth*P, H)
        want = [init if layer + d == 0 else states[layer + d][0, 1:] for d in range(depth)]
        torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("depth", "template"), [(1, "prefix"), (1, "suffix"), (2, "prefix"), (2, "suffix")])
def test_validation_from_kept_states_gives_the_whole_bases_metrics(three_blocks, depth: int, template: str) -> None:
    """A late prompt's validation from the rows' kept states (first from fresh ones, then from kept ones) gives what
    validation through the whole base gives; its greedy hit rule reads the token greedy decoding writes first."""
    from types import SimpleNamespace

    from ptcli.data.encode import answer_tokens, closed_answers, encode
    from ptcli.data.jsonl import Record
    from ptcli.lm.answers import run_rows
    from ptcli.tuning.loss import labelled
    from ptcli.tuning.task import Task
    from ptcli.tuning.validate import evaluate, evaluate_kept, keeps_states

    model, tok = three_blocks
    records = [Record(i, "tag", t, a, {}) for i, (t, a) in enumerate(ROWS)]
    enc = encode(tok, records, P, 64, True, template=template)
    choices = closed_answers(records)
    assert choices == ["negative", "positive"]
    cfg = SimpleNamespace(answer_only=True)
    task = Task("tag", cfg, enc, enc, choices, "", [0], answer_tokens(tok, choices))  # type: ignore[arg-type]

    class One:
        process_index, num_processes, device = 0, 1, "cpu"

        def reduce(self, t, op):
            return t

    prompts = _prompts(model, k=1, n=depth * P) * 4  # (1, D*P, H): large enough to move the answers
    assert keeps_states(task, prompts) and not keeps_states(task, torch.cat([prompts, prompts]))  # no ensembles
    states = FrozenStates(model, 1, bound=1 << 30)
    with entering(model, 1, depth):
        whole = evaluate(model, tok, prompts, task, 3, One())
        fresh = evaluate_kept(model, prompts, task, states, 1, depth, 3, One())
        computed = states.computed
        kept = evaluate_kept(model, prompts, task, states, 1, depth, 3, One())
        assert states.computed == computed == len(ROWS) * len(choices)  # every row ran below K once
        for got in (fresh, kept):
            assert got.keys() == whole.keys()
            assert got["val_acc_rank"] == whole["val_acc_rank"] and got["val_acc"] == whole["val_acc"]
            assert got["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)

        # the hit rule's first token is the token greedy decoding writes first, row by row
        gold = [choices.index(a) for a in enc.answers]
        rows = StepRows([], [], [], [], [], [])
        for b, (context, g) in enumerate(zip(enc.prompts, gold)):
            rows.seqs.append(context + task.candidates[g])
            rows.labels.append([IGNORE] * len(context) + task.candidates[g])
            rows.which.append(0)
            rows.keys.append(("gold", b))
            rows.example.append(b)
        h, t, row_of = labelled(model, prompts, rows, 0, FrozenStates(model, 1, bound=1 << 30), 1, depth)
        firsts = to_logits(model, h).argmax(-1)[[list(row_of).index(b) for b in range(len(ROWS))]]  # (B,)
        greedy = run_rows(model, tok, [prompts], enc.prompts, [0] * len(ROWS), max_new=1)
    assert [row[0][0] if row[0] else tok.eos_token_id for row in greedy.tokens] == firsts.tolist()
