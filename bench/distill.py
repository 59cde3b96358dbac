"""`ptcli distill` on the example tasks: a ~250-token few-shot teacher into 16 vectors, measured in one run.

    python bench/distill.py                 # both tags, --minutes 6 each; bench/results/distill.{json,md}
    python bench/distill.py --minutes reviews=40,topic=8   # minutes of each tag
    python bench/distill.py --quick         # a short configuration (tests keep it working)
    python bench/distill.py --table         # print the table of the committed JSON
    python bench/distill.py --readme-table  # README's short table of it

For each tag of examples/data (reviews, topic), on the default base:
  teacher    a chat-format instruction and --shots worked examples from train.jsonl (class-balanced), where
             the tag's prompt goes; the row follows as a user turn, the answer is the assistant's
  student    `ptcli distill` into the project's 16 vectors, started from the teacher text (clipped), trained
             on the other training texts without their labels for --minutes, kept by agreement with the
             teacher on valid.jsonl's texts (labels ignored)
  zero_shot  the instruction alone, where the prompt goes
Then on test.jsonl's rows of the tag, each answering greedily through the same ptcli path (the teacher and
the zero-shot text as bank prompts of projects of their own length, their tokens' embeddings):
  agreement  the share of the student's answers equal to the teacher's (the target: >= 0.95)
  accuracy   teacher, student and zero-shot against the labels
  rows/s     answering the rows (model loaded, `ptcli infer`'s plan), batches of 16 and of 1, student
             against teacher, each in a worker process of its own, one after another: a warm-up batch, then
             the median of --repeats whole passes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
TEMPLATE = "{prompt}<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}"
INSTRUCTIONS = {
    "reviews": "You label movie reviews. Read the review and answer with one word: positive or negative.",
    "topic": "You label news snippets by topic. Read the snippet and answer with one word: food, science or sports.",
}
P = 16
DEFAULT_MINUTES = 6.0


def minutes_of(value: str) -> dict[str, float]:
    """`--minutes`: "6" for every tag ("*"), or "reviews=40,topic=8"."""
    if "=" not in value:
        return {"*": float(value)}
    pairs = [part.split("=", 1) for part in value.split(",")]
    return {tag: float(m) for tag, m in pairs}


def teacher_texts(tag: str, shots: int) -> tuple[str, str, set[str]]:
    """(few-shot teacher text, instruction alone, texts used as shots) in the base's chat markup."""
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["prompt_tag"] == tag]
    answers = sorted({r["answer"] for r in rows})
    picked = []
    for i in range(shots):  # class-balanced, in a fixed interleaved order
        a = answers[i % len(answers)]
        picked.append(next(r for r in rows if r["answer"] == a and r not in picked))
    system = f"<|im_start|>system\n{INSTRUCTIONS[tag]}<|im_end|>\n"
    turns = "".join(
        f"<|im_start|>user\n{r['text']}<|im_end|>\n<|im_start|>assistant\n{r['answer']}<|im_end|>\n" for r in picked
    )
    return system + turns, system, {r["text"] for r in picked}


def ptcli(*args) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "ptcli", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ptcli {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return out


def text_prompt(project: Path, tag: str, text: str) -> None:
    """Put `text`'s token embeddings into `project`'s bank as `tag`'s prompt: the text, answering as a prompt."""
    from ptcli.config import TaskConfig
    from ptcli.enums import Mode
    from ptcli.lm.base import load_project_base
    from ptcli.project import bank
    from ptcli.project import manifest as proj
    from ptcli.project.record import PromptRecord
    from ptcli.tuning.teacher import teacher_ids, teacher_prompt

    p = proj.load(project)
    model, tok = load_project_base(p.base)
    prompt = teacher_prompt(model, teacher_ids(tok, text))
    assert prompt.shape[0] == p.num_prompt_tokens
    cfg = TaskConfig(train="-", valid="-", template=TEMPLATE).to_dict()
    bank.put(p, tag, prompt, PromptRecord(init="text", mode=Mode.GENERATE, config=cfg))


def token_count(text: str) -> int:
    """Tokens of `text` in the default base's tokenizer, as distill tokenizes a teacher text."""
    from transformers import AutoTokenizer

    from ptcli.lm.source import resolve
    from ptcli.tuning.teacher import teacher_ids

    return len(teacher_ids(AutoTokenizer.from_pretrained(resolve("default", lambda _: None)), text))


def worker(project: Path, path: Path, batch_size: int, max_new: int, repeats: int, out: Path) -> None:
    """Answer `path`'s rows with `project`'s prompts as `ptcli infer` plans them, `repeats` times after a warm-up
    batch; time the answering alone (median pass)."""
    import resource

    from ptcli.config import BaseOptions
    from ptcli.enums import Mode
    from ptcli.inference.engine import Item, Prompt
    from ptcli.inference.infer import open_engine, plan, records_of
    from ptcli.project import bank
    from ptcli.project import manifest as proj

    p = proj.load(project)
    eng = open_engine(p, BaseOptions(), 1, "cpu", lambda _: None)
    records = records_of(path)
    prompts = {t: Prompt.of(t, *bank.get(p, t)) for t in {r.tag for r in records}}
    items = [Item(prompts[r.tag], r.text, Mode.GENERATE, max_new, ()) for r in records]
    seqs = [s for s in eng.rows(items) if isinstance(s, list)]
    batches = list(plan(eng, items, seqs, batch_size))
    eng.run([items[i] for i in batches[0]], [seqs[i] for i in batches[0]])  # warm-up: allocator, kernels, caches
    passes = []
    for _ in range(repeats):  # whole passes; the median is what one pass costs on a shared VM
        answers: dict[int, str] = {}
        t0 = time.perf_counter()
        for idx in batches:
            answers.update((i, a.text) for i, a in zip(idx, eng.run([items[i] for i in idx], [seqs[i] for i in idx])))
        passes.append(time.perf_counter() - t0)
    seconds = statistics.median(passes)
    predictions = [answers[i] for i in range(len(records))]
    correct = sum(pr == (r.answer or "").strip() for pr, r in zip(predictions, records))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    out.write_text(
        json.dumps(
            {
                "rows": len(records),
                "seconds": seconds,
                "rows_per_s": len(records) / seconds,
                "passes_seconds": [round(x, 3) for x in passes],
                "accuracy": correct / len(records),
                "peak_rss_mib": peak,
                "predictions": predictions,
            }
        )
    )


def kl_gap(project: Path, tag: str, teacher_file: Path, path: Path, max_new: int, out: Path) -> None:
    """The student's KL to the teacher on `path`'s rows over the whole vocabulary and over the top 64 + the rest
    (what training minimises): how much the bucketed KL leaves out."""
    import torch

    from ptcli.data.template import Layout
    from ptcli.inference.infer import records_of
    from ptcli.lm.base import load_project_base
    from ptcli.project import bank
    from ptcli.project import manifest as proj
    from ptcli.tuning.teacher import ask, kl, said_logprobs, teacher_ids, teacher_prompt, topk

    p = proj.load(project)
    model, tok = load_project_base(p.base)
    text = teacher_file.read_text()
    t_ids = teacher_ids(tok, text)
    texts = tok([r.text for r in records_of(path)], add_special_tokens=False).input_ids
    student, teacher = Layout(tok, TEMPLATE, P), Layout(tok, TEMPLATE, len(t_ids))
    prompt = bank.get(p, tag)[0]
    full, bucketed, n = 0.0, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(texts), 16):
            batch = texts[s : s + 16]
            said = ask(model, tok, teacher_prompt(model, t_ids), [teacher.context(t) for t in batch], max_new, 0, 16)
            logp = said_logprobs(model, prompt, [student.context(t) for t in batch], [x.targets for x in said], 0)
            t_logp = torch.cat([x.logp for x in said])  # (N, V)
            full += float(kl(logp, None, t_logp, torch.full(t_logp.shape[:1], float("-inf"))).sum())
            bucketed += float(kl(logp, *topk(t_logp, 64)).sum())
            n += t_logp.shape[0]
    out.write_text(json.dumps({"positions": n, "kl_full": full / n, "kl_top64": bucketed / n}))


def answer(project: Path, path: Path, batch_size: int, max_new: int, repeats: int, work: Path) -> dict:
    out = work / f"answers-{project.name}-{batch_size}.json"
    args = [project, path, batch_size, max_new, repeats, out]
    subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], check=True)
    return json.loads(out.read_text())


def run_tag(tag: str, args: argparse.Namespace, work: Path) -> dict:
    teacher, instruction, shot_texts = teacher_texts(tag, args.shots)
    (work / f"{tag}-teacher.txt").write_text(teacher)
    rows = {
        s: [json.loads(x) for x in (EXAMPLES / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "valid", "test")
    }
    rows = {s: [r for r in rs if r["prompt_tag"] == tag] for s, rs in rows.items()}
    inputs = [{"prompt_tag": tag, "text": r["text"]} for r in rows["train"] if r["text"] not in shot_texts]
    files = {}
    for name, part in (("inputs", inputs), ("valid", rows["valid"]), ("test", rows["test"][: args.test_rows])):
        files[name] = work / f"{tag}-{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    minutes = args.minutes.get(tag, args.minutes.get("*", DEFAULT_MINUTES))
    student = work / f"{tag}-student"
    ptcli("init", student, "--num-prompt-tokens", P, "-q")
    t0 = time.perf_counter()
    done = ptcli(
        "distill",
        "--tag",
        tag,
        "--from-file",
        work / f"{tag}-teacher.txt",
        "--inputs",
        files["inputs"],
        "--valid",
        files["valid"],
        "--template",
        TEMPLATE,
        "--max-new-tokens",
        args.max_new,
        "--max-minutes",
        minutes,
        "--max-steps",
        100000,
        "--val-check-interval",
        args.val_every,
        "--lr",
        args.lr,
        "--temperature",
        args.temperature,
        "-p",
        student,
        "--json",
        "-q",
    )
    distill_seconds = time.perf_counter() - t0
    result = json.loads(done.stdout)
    projects = {"student": student}
    for name, text in (("teacher", teacher), ("zero_shot", instruction)):
        projects[name] = work / f"{tag}-{name}"
        ptcli("init", projects[name], "--num-prompt-tokens", token_count(text), "-q")
        text_prompt(projects[name], tag, text)
    answers = {
        (name, b): answer(projects[name], files["test"], b, args.max_new, args.repeats, work)
        for name in ("teacher", "student", "zero_shot")
        for b in ((16, 1) if name != "zero_shot" else (16,))
    }
    t, s = answers["teacher", 16]["predictions"], answers["student", 16]["predictions"]
    gap = work / f"{tag}-kl.json"
    gap_args = [student, tag, work / f"{tag}-teacher.txt", files["test"], args.max_new, gap]
    subprocess.run([sys.executable, __file__, "--kl-gap", *map(str, gap_args)], check=True)
    return {
        "teacher_tokens": token_count(teacher),
        "prompt_tokens": P,
        "inputs": len(inputs),
        "test_rows": len(t),
        "distill": {k: result[k] for k in ("steps", "best_step", "metrics", "initial_metrics", "seconds")}
        | {"minutes": minutes, "wall_seconds": round(distill_seconds, 1)},
        "agreement": sum(a == b for a, b in zip(s, t)) / len(t),
        "test_kl": json.loads(gap.read_text()),
        "accuracy": {name: answers[name, 16]["accuracy"] for name in ("teacher", "student", "zero_shot")},
        "rows_per_s": {f"{name} batch {b}": answers[name, b]["rows_per_s"] for name, b in answers},
        "speedup": {
            f"batch {b}": answers["student", b]["rows_per_s"] / answers["teacher", b]["rows_per_s"] for b in (16, 1)
        },
        "peak_rss_mib": {name: answers[name, 16]["peak_rss_mib"] for name in ("teacher", "student")},
    }


def table(results: dict) -> str:
    lines = [
        "| tag | teacher tokens | student vectors | minutes: steps (kept) | val agreement | test agreement | "
        "teacher acc | student acc | zero-shot acc | student / teacher rows/s, batch 16 | batch 1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tag, r in results["tags"].items():
        d, a, v = r["distill"], r["accuracy"], r["rows_per_s"]
        lines.append(
            f"| {tag} | {r['teacher_tokens']} | {r['prompt_tokens']} | "
            f"{d.get('minutes', results['config']['minutes']):g}: {d['steps']} ({d['best_step']}) | "
            f"{d['initial_metrics']['val_acc']:.3f} -> {d['metrics']['val_acc']:.3f} | {r['agreement']:.3f} | "
            f"{a['teacher']:.3f} | {a['student']:.3f} | {a['zero_shot']:.3f} | "
            f"{v['student batch 16']:.1f} / {v['teacher batch 16']:.1f} ({r['speedup']['batch 16']:.2f}x) | "
            f"{v['student batch 1']:.1f} / {v['teacher batch 1']:.1f} ({r['speedup']['batch 1']:.2f}x) |"
        )
    return "\n".join(lines)


def readme_table(results: dict) -> str:
    """README's short form of `table`: what the distilled prompt keeps, and what it saves."""
    lines = [
        "| tag | teacher text → prompt | agreement | accuracy, teacher / student | speed vs teacher, batch 1 / 16 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for tag, r in results["tags"].items():
        a, x = r["accuracy"], r["speedup"]
        lines.append(
            f"| {tag} | {r['teacher_tokens']} tokens → {r['prompt_tokens']} vectors | {r['agreement']:.3f} | "
            f"{a['teacher']:.3f} / {a['student']:.3f} | {x['batch 1']:.2f}x / {x['batch 16']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        project, path, batch, max_new, repeats, out = sys.argv[2:]
        return worker(Path(project), Path(path), int(batch), int(max_new), int(repeats), Path(out))
    if sys.argv[1:2] == ["--kl-gap"]:
        project, tag, teacher_file, path, max_new, out = sys.argv[2:]
        return kl_gap(Path(project), tag, Path(teacher_file), Path(path), int(max_new), Path(out))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="+", default=list(INSTRUCTIONS), choices=list(INSTRUCTIONS))
    ap.add_argument("--shots", type=int, default=8, help="worked examples in the teacher text")
    ap.add_argument(
        "--minutes", type=minutes_of, default={}, help="distill's --max-minutes: M for every tag, or tag=M,tag=M"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the test rows (median)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--max-new", type=int, default=4, help="distill's --max-new-tokens, and infer's")
    ap.add_argument("--temperature", type=float, default=0.0, help="distill's --temperature (0: greedy teacher)")
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--test-rows", type=int, default=None, help="first N test rows of each tag (default: all)")
    ap.add_argument("--quick", action="store_true", help="one tag, 2 shots, 0.3 minutes, 8 test rows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill.json")
    ap.add_argument("--table", action="store_true", help="print the committed JSON's table and stop")
    ap.add_argument("--readme-table", action="store_true", help="print README's table of the committed JSON and stop")
    args = ap.parse_args()
    if args.table:
        return print(table(json.loads(args.out.read_text())))
    if args.readme_table:
        return print(readme_table(json.loads(args.out.read_text())))
    if set(args.minutes) - {"*", *INSTRUCTIONS}:
        ap.error(f"--minutes names unknown tags; the tags are {', '.join(INSTRUCTIONS)}")
    if args.quick:
        args.tags, args.shots, args.minutes, args.test_rows, args.val_every, args.repeats = (
            ["reviews"],
            2,
            {"*": 0.3},
            8,
            5,
            1,
        )
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine.describe(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "table", "readme_table")}
        | {"template": TEMPLATE},
        "tags": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for tag in args.tags:
            print(f"{tag} ...", file=sys.stderr, flush=True)
            results["tags"][tag] = run_tag(tag, args, Path(tmp))
    if not args.quick:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
