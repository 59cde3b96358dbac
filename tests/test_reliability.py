"""Reliability: bad input gets a clear error, a kill loses nothing, two writers cannot collide.

- `read_jsonl` under random and mutated input (hypothesis): records or InputError, never a traceback;
- `tune` killed with SIGKILL mid-run and inside its writes, each at a named moment: the bank stays valid, earlier
  prompts keep their bytes, and `--resume` ends on the prompt of an uninterrupted run;
- two `tune` processes on one project: one runs, the other names the lock's holder;
- pickles planted where a prompt or a checkpoint should be: refused by name, never run;
- `atomic_write` when the rename fails, the disk is full, or the write is interrupted;
- the CLI's validation report end to end: every problem as `file:line: message`, exit 2, nothing written.

Killed runs are real `python -m ptcli` processes (about 3 s of imports each, so two run at a time);
everything else runs in process. Torch uses one thread everywhere, so runs repeat bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import torch
from clihelp import cli, failed, ok
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptcli.data.encode import encode
from ptcli.data.jsonl import MAX_REPORTED, TRAIN_FIELDS, Record, read_jsonl
from ptcli.errors import InputError, ProjectError
from ptcli.project import bank, runs, storage
from ptcli.project import manifest as proj

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 4
STEPS = 30
# Child processes: one torch thread like the tests (same kernels, same bits), and no pointless thread pools.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

ROWS = [
    ("i love it", "positive"),
    ("i hate it", "negative"),
    ("i really like the movie", "positive"),
    ("i dislike the food", "negative"),
    ("i adore this", "positive"),
    ("i loathe the phone", "negative"),
]


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


def _copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def _tune_args(tag: str, data: Path, steps: int = STEPS) -> list[str]:
    """`tune` with a checkpoint (and a write) after every step: a kill always lands near one."""
    path = data / f"{tag}.jsonl"
    return [
        "tune",
        "--tag",
        tag,
        "--train",
        str(path),
        "--valid",
        str(path),
        "--warmup-steps",
        "2",
        "--max-steps",
        str(steps),
        "--val-check-interval",
        "1",
        "--batch-size",
        "4",
        "--max-seq-length",
        "64",
        "--lr",
        "0.1",
        "--seed",
        "7",
    ]


def _saved(root: Path) -> dict[str, bytes]:
    """The bytes of the manifest and of every bank entry."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in [root / "ptcli.json", *sorted((root / "bank").iterdir())]
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    for tag in ("first", "second"):
        (d / f"{tag}.jsonl").write_text(
            "".join(json.dumps({"prompt_tag": tag, "text": t, "answer": a}) + "\n" for t, a in ROWS)
        )
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, lively_llama: Path) -> Path:
    """An empty project on the tiny model."""
    root = tmp_path_factory.mktemp("base") / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", P, "-q"))
    return root


@pytest.fixture(scope="module")
def with_first(base: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project holding one tuned tag, `first`."""
    root = _copy(base, tmp_path_factory.mktemp("with_first") / "p")
    ok(cli(*_tune_args("first", data_dir), "-p", root, "-q"))
    return root


# ---------------------------------------------------------------- read_jsonl under random input


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_json: str):
    from conftest import make_tokenizer

    return make_tokenizer(tiny_tokenizer_json)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jsonl") / "data.jsonl"


@contextlib.contextmanager
def _stdin(blob: bytes):
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(blob))
    try:
        yield
    finally:
        sys.stdin = saved


def _load(blob: bytes, path: Path, tok, *, training: bool, tag: str | None, stdin: bool) -> list[Record] | InputError:
    """Read `blob` as ptcli would and check the outcome's contract; any other exception escapes and fails the test.

    Loaded: every record is valid for its mode and survives what ptcli does next (tokenizing; writing
    the row back out). Refused: every problem is one line, `name:LINE: message` (or the whole-file
    `name: no data rows`), at most MAX_REPORTED of them, then a count line.
    """
    name = "<stdin>" if stdin else str(path)
    n_lines = len(blob.split(b"\n"))
    try:
        if stdin:
            with _stdin(blob):
                records = read_jsonl("-", training=training, tag=tag)
        else:
            path.write_bytes(blob)
            records = read_jsonl(str(path), training=training, tag=tag)
    except InputError as e:
        event("refused")
        assert e.exit_code == 2 and e.problems
        more = re.fullmatch(r"\.\.\. and (\d+) more problems", e.problems[-1])
        located = e.problems[:-1] if more else e.problems
        assert 1 <= len(located) <= MAX_REPORTED and (not more or len(located) == MAX_REPORTED)
        assert e.message == f"{name} has {len(located) + (int(more[1]) if more else 0)} problem(s)"
        if located == [f"{name}: no data rows"]:
            return e
        numbers = []
        for p in located:
            assert "\n" not in p and "\r" not in p, p
            m = re.match(rf"{re.escape(name)}:(\d+): \S", p)
            assert m, p
            numbers.append(int(m[1]))
        assert numbers == sorted(numbers) and 1 <= numbers[0] and numbers[-1] <= n_lines
        return e
    event("loaded")
    assert records and all(isinstance(r, Record) for r in records)
    lines = [r.line for r in records]
    assert lines == sorted(set(lines)) and 1 <= lines[0] and lines[-1] <= n_lines
    for r in records:
        assert isinstance(r.tag, str) and r.tag.strip() and isinstance(r.text, str) and r.text.strip()
        assert r.answer is None or (isinstance(r.answer, str) and r.answer.strip())
        if training:
            assert set(r.row) == set(TRAIN_FIELDS) and r.answer is not None
            assert tag is None or r.tag == tag
        json.dumps(r.row, ensure_ascii=False).encode("utf-8")  # infer writes each row back out as UTF-8
    encode(tok, records, P, 100_000, answer_only=True)  # the tokenizer takes every text and answer
    return records


MODES = st.sampled_from([(True, "sent"), (True, None), (False, None)])
GOOD = {"prompt_tag": "sent", "text": "i love it", "answer": "positive"}
# Byte strings that stress a JSON Lines reader: markers, line ends, escapes, broken UTF-8, deep nesting.
SPICE = [
    b"\xef\xbb\xbf",
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b'"',
    b"{",
    b"}",
    b"[",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xe2\x80\xa8",
    b"1e999",
    b"NaN",
    b"9" * 5000,
    b"[" * 5000,
    b'{"a":' * 3000,
    _line(GOOD),
    _line({**GOOD, "text": ""}),
    _line({**GOOD, "id": 1}),
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from([*TRAIN_FIELDS, "id", ""]) | st.text(max_size=6)
VALUE = st.sampled_from(["sent", "i love it"]) | st.text(max_size=12) | JSON
# Rows that often have the right fields, so that some load: each field present or not, any value, maybe extras.
ROW = st.builds(
    lambda fields, extra: {**fields, **extra},
    st.fixed_dictionaries({}, optional={key: VALUE for key in TRAIN_FIELDS}),
    st.just({}) | st.dictionaries(KEYS, JSON, max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=40) | st.sampled_from(SPICE), max_size=10), mode=MODES, stdin=st.booleans())
def test_random_bytes_load_or_report(tok, scratch: Path, chunks: list[bytes], mode, stdin: bool) -> None:
    training, tag = mode
    _load(b"".join(chunks), scratch, tok, training=training, tag=tag, stdin=stdin)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(ROW, min_size=1, max_size=4) | st.lists(ROW | JSON, max_size=8),
    ascii_only=st.booleans(),
    end=st.sampled_from([b"\n", b"\r\n"]),
    mode=MODES,
)
def test_random_json_values_load_or_report(
    tok, scratch: Path, values: list, ascii_only: bool, end: bytes, mode
) -> None:
    training, tag = mode
    blob = b"".join(json.dumps(v, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + end for v in values)
    _load(blob, scratch, tok, training=training, tag=tag, stdin=False)


ROW_MUTATIONS = [
    "swap values",
    "rename field",
    "drop field",
    "extra field",
    "wrong type",
    "empty",
    "other tag",
    "lone surrogate",
]
BYTE_MUTATIONS = ["delete", "duplicate", "insert", "truncate", "bom", "crlf"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    pairs=st.lists(
        st.tuples(st.text(min_size=1, max_size=16), st.text(min_size=1, max_size=8)), min_size=1, max_size=5
    ),
    mode=MODES,
)
def test_mutated_valid_files_load_or_report(tok, scratch: Path, data, pairs: list[tuple[str, str]], mode) -> None:
    training, tag = mode
    rows = [{"prompt_tag": "sent", "text": t, "answer": a} for t, a in pairs]
    row_edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(rows) - 1), st.sampled_from(ROW_MUTATIONS)), max_size=3)
    )
    for i, kind in row_edits:
        row = rows[i]
        field = data.draw(st.sampled_from(sorted(row) or ["text"]))
        if kind == "swap values" and len(row) > 1:
            a, b = data.draw(st.permutations(sorted(row)))[:2]
            row[a], row[b] = row[b], row[a]
        elif kind == "rename field" and field in row:
            row[data.draw(KEYS)] = row.pop(field)
        elif kind == "drop field":
            row.pop(field, None)
        elif kind == "extra field":
            row[data.draw(KEYS)] = data.draw(JSON)
        elif kind == "wrong type":
            row[field] = data.draw(JSON)
        elif kind == "empty":
            row[field] = data.draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
        elif kind == "other tag":
            row["prompt_tag"] = data.draw(st.text(max_size=6))
        elif kind == "lone surrogate":
            row[field] = f"a{chr(data.draw(st.integers(0xD800, 0xDFFF)))}b"
    blob = b"".join(
        json.dumps(r, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass") + b"\n" for r in rows
    )
    byte_edits = data.draw(st.lists(st.sampled_from(BYTE_MUTATIONS), max_size=4))
    for kind in byte_edits:
        at = data.draw(st.integers(0, len(blob)))
        if kind == "delete":
            blob = blob[:at] + blob[at + 1 :]
        elif kind == "duplicate":
            blob = blob[: at + 1] + blob[at:]
        elif kind == "insert":
            blob = blob[:at] + data.draw(st.sampled_from(SPICE) | st.binary(min_size=1, max_size=4)) + blob[at:]
        elif kind == "truncate":
            blob = blob[:at]
        elif kind == "bom":
            blob = b"\xef\xbb\xbf" + blob
        elif kind == "crlf":
            blob = blob.replace(b"\n", b"\r\n")
    outcome = _load(blob, scratch, tok, training=training, tag=tag, stdin=data.draw(st.booleans()))
    if not row_edits and not byte_edits and all(t.strip() and a.strip() for t, a in pairs):
        assert [(r.text, r.answer) for r in outcome] == pairs  # an untouched valid file loads as written


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"[" * 100_000, "invalid JSON (nested too deeply)"),
        (b'{"a": ' * 100_000, "invalid JSON (nested too deeply)"),
        (
            _line({**GOOD, "text": "a\ud800b"}),
            "field 'text' holds a lone surrogate '\\ud800', which is not valid Unicode",
        ),
        (_line({**GOOD, "id": "\udfff"}), "field 'id' holds a lone surrogate '\\udfff', which is not valid Unicode"),
    ],
    ids=["deep array", "deep object", "surrogate in text", "surrogate in a passed-through field"],
)
def test_hostile_rows_found_by_fuzzing(scratch: Path, blob: bytes, message: str) -> None:
    """Regressions: these raised RecursionError, or loaded and then crashed the tokenizer / the output writer."""
    scratch.write_bytes(_line(GOOD) + b"\n" + blob + b"\n")
    with pytest.raises(InputError) as info:
        read_jsonl(str(scratch), training=False)
    assert info.value.problems == [f"{scratch}:2: {message}"]


# ---------------------------------------------------------------- SIGKILL at named moments

# Imported by every Python process that has its folder on PYTHONPATH (see `_hooked`). With PTCLI_TEST_AT
# set, the process stops at its PTCLI_TEST_NTH rename of a finished temp file onto a path ending so: just
# before the rename, i.e. in the middle of one of ptcli's atomic writes, or with PTCLI_TEST_AFTER set just
# after it. There it writes its pid to PTCLI_TEST_MARK (the proof that it got there), then SIGKILLs itself,
# or, with PTCLI_TEST_WAIT_FOR set, waits there (holding whatever it holds) until that file exists.
HOOK = """
import os, signal, time
_target = os.environ.get("PTCLI_TEST_AT")
if _target:
    _nth, _after = int(os.environ.get("PTCLI_TEST_NTH") or 1), bool(os.environ.get("PTCLI_TEST_AFTER"))
    _mark, _release = os.environ.get("PTCLI_TEST_MARK"), os.environ.get("PTCLI_TEST_WAIT_FOR")
    _replace, _seen = os.replace, [0]

    def _stop():
        if _mark:
            with open(_mark, "w") as f:
                f.write(str(os.getpid()))
        if not _release:
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 900  # past every test's own deadline: only an orphan waits this long
        while not os.path.exists(_release) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _replace_hooked(src, dst, *args, **kwargs):
        hit = os.fspath(dst).endswith(_target)
        _seen[0] += hit
        hit = hit and _seen[0] == _nth
        if hit and not _after:
            _stop()
        result = _replace(src, dst, *args, **kwargs)
        if hit and _after:
            _stop()
        return result

    os.replace = _replace_hooked
"""
# How long any wait on a child may take: far more than a loaded machine needs, so only a hang reaches it.
DEADLINE = 300


def _hooked(
    hook: Path, at: str, *, nth: int = 1, after: bool = False, mark: Path | None = None, wait_for: Path | None = None
) -> dict[str, str]:
    """Environment for a child process that runs HOOK at its `nth` write to `at`."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "PTCLI_TEST_AT": at,
        "PTCLI_TEST_NTH": str(nth),
        "PTCLI_TEST_AFTER": "1" if after else "",
        "PTCLI_TEST_MARK": str(mark or ""),
        "PTCLI_TEST_WAIT_FOR": str(wait_for or ""),
    }


# Everything a project may hold after these runs, besides temp files.
KNOWN_FILES = {
    "ptcli.json",
    ".ptcli.lock",
    "bank/first.safetensors",
    "bank/second.safetensors",
    "runs/first/metrics.jsonl",
    "runs/second/metrics.jsonl",
    "runs/first/checkpoint.safetensors",
    "runs/second/checkpoint.safetensors",
    "runs/history.jsonl",
}


@dataclass
class Kill:
    """One `ptcli tune` process, the moment it is killed at, and what the kill must leave.

    `at_step`: SIGKILLed from here as soon as it reports validating that step, wherever the kill finds it
    (writing that step's checkpoint, training or validating the next). `kill_at`: it SIGKILLs itself at its
    `nth` write to a path ending so, just before the rename or just `after` it. Then the run must be
    `leaves` ("resumed", "restarted" or "finished"), a resume from a checkpoint of one of `ckpt_steps`.
    """

    name: str
    root: Path
    leaves: str
    ckpt_steps: range = range(0)
    tag: str = "second"
    at_step: int | None = None
    kill_at: str | None = None
    nth: int = 1
    after: bool = False
    extra: tuple[str, ...] = ()
    pid: int = 0
    alive_at_kill: bool = False
    returncode: int | None = None
    stderr: str = ""

    @property
    def mark(self) -> Path:
        """Where the hook writes the pid of the process it stops."""
        return self.root.with_name(f"{self.root.name}.reached")


def _run(job: Kill, data: Path, hook: Path) -> Kill:
    env = {**os.environ, **ONE_THREAD}
    if job.kill_at:
        env.update(_hooked(hook, job.kill_at, nth=job.nth, after=job.after, mark=job.mark))
    cmd = [sys.executable, "-m", "ptcli", *_tune_args(job.tag, data), *job.extra, "-p", str(job.root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    job.pid = proc.pid
    watchdog = threading.Timer(DEADLINE, proc.kill)  # a hung child fails the checks below, not the whole session
    watchdog.start()
    seen = b""
    try:
        if job.at_step is not None:
            for raw in proc.stderr:  # "step k: val_loss ..." after step k's validation, before its checkpoint
                seen += raw
                if raw.startswith(b"step %d:" % job.at_step):
                    job.alive_at_kill = proc.poll() is None
                    proc.kill()
                    break
        _, rest = proc.communicate()
    finally:
        watchdog.cancel()
    job.returncode, job.stderr = proc.returncode, (seen + rest).decode(errors="replace")
    return job


def _sound(root: Path, first_bytes: bytes | None) -> set[str]:
    """The project after a kill: listing works, the manifest parses, every entry is whole.

    Returns the temp files left.
    """
    result = cli("list-tags", "--json", "-p", root)
    ok(result)
    listed = [e["tag"] for e in json.loads(result.stdout)]
    p = proj.load(root)
    assert "first" in listed and set(listed) <= {"first", "second"} and listed == bank.tags(p)
    for tag in listed:
        bank.get(p, tag)  # checksum, structure and base checks: no entry is half written
    if first_bytes is not None:
        assert (root / "bank" / "first.safetensors").read_bytes() == first_bytes
    files = {f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()}
    leftovers = files - KNOWN_FILES
    # only the hidden temp files of interrupted atomic writes, which no ptcli command reads
    assert all(re.fullmatch(r"(bank/|runs/\w+/)?\.[^/]+\.tmp", f) for f in leftovers), leftovers
    return leftovers


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hook")
    (d / "sitecustomize.py").write_text(HOOK)
    return d


CKPT = "runs/second/checkpoint.safetensors"
LAST = range(STEPS, STEPS + 1)  # the checkpoint of the last step, kept until the bank holds the prompt


@pytest.mark.slow  # tune subprocesses killed mid-run and at each write
def test_sigkill_loses_nothing_and_resume_matches(with_first: Path, data_dir: Path, hook: Path, tmp_path: Path) -> None:
    first_bytes = (with_first / "bank" / "first.safetensors").read_bytes()
    first_prompt, first_meta = bank.get(proj.load(with_first), "first")

    ref_root = _copy(with_first, tmp_path / "reference")
    ok(cli(*_tune_args("second", data_dir), "-p", ref_root, "-q"))
    reference, ref_meta = bank.get(proj.load(ref_root), "second")
    expected = {
        "second": (reference, ref_meta.best_step, proj.load(ref_root).tasks["second"]),
        "first": (first_prompt, first_meta.best_step, proj.load(with_first).tasks["first"]),
    }

    # Mid-run, early to late: when step k is reported its predecessor's checkpoint is in place, and at least
    # seven steps are left, so the run cannot finish before the kill lands.
    jobs = [
        Kill(f"after step {k} is reported", tmp_path / f"step-{k}", "resumed", range(k - 1, STEPS), at_step=k)
        for k in (2, 9, 16, 23)
    ]
    jobs += [
        Kill("in the first checkpoint write", tmp_path / "ckpt-1", "restarted", kill_at=CKPT),
        Kill("in the 10th checkpoint write", tmp_path / "ckpt-10", "resumed", range(9, 10), kill_at=CKPT, nth=10),
        Kill(
            "just after the 20th checkpoint write",
            tmp_path / "ckpt-20",
            "resumed",
            range(20, 21),
            kill_at=CKPT,
            nth=20,
            after=True,
        ),
        Kill("in the manifest write", tmp_path / "manifest-write", "resumed", LAST, kill_at="ptcli.json"),
        Kill("in the bank write", tmp_path / "bank-write", "resumed", LAST, kill_at="bank/second.safetensors"),
        Kill("in the run-log write", tmp_path / "log-write", "finished", kill_at="runs/second/metrics.jsonl"),
        Kill(
            "in the bank write of a retune",
            tmp_path / "retune",
            "resumed",
            LAST,
            tag="first",
            kill_at="bank/first.safetensors",
            extra=("--overwrite",),
        ),
    ]
    for job in jobs:
        _copy(with_first, job.root)

    pool = ThreadPoolExecutor(2)  # two killed runs at a time; each is checked and recovered as it ends
    try:
        for job in pool.map(lambda job: _run(job, data_dir, hook), jobs):
            _check_and_recover(job, data_dir, first_bytes, expected)
    finally:
        pool.shutdown(cancel_futures=True)


def _check_and_recover(job: Kill, data_dir: Path, first_bytes: bytes, expected: dict) -> None:
    """The kill landed at its moment and the project is sound; then resume (or restart, or nothing) reaches the
    uninterrupted prompt."""
    assert job.returncode == -signal.SIGKILL, f"{job.name}: exit {job.returncode}\n{job.stderr}"
    if job.at_step is not None:
        reported = [int(k) for k in re.findall(r"^step (\d+):", job.stderr, re.MULTILINE)]
        # killed at step k (or just after, had the run moved on before the signal), and not near the end
        assert job.alive_at_kill and job.at_step in reported and max(reported) < STEPS, f"{job.name}: {reported}"
    else:
        assert job.mark.exists() and job.mark.read_text() == str(job.pid), f"{job.name}: not killed there"
    leftovers = _sound(job.root, first_bytes)
    if job.kill_at and not job.after:  # killed before the rename: the finished temp file is left, unread
        target = PurePosixPath(job.kill_at)
        temp = target.with_name(f".{target.name}.").as_posix()
        assert any(f.startswith(temp) for f in leftovers), (job.name, leftovers)

    args = [*_tune_args(job.tag, data_dir), *job.extra, "-p", job.root, "-q"]
    p = proj.load(job.root)
    ckpt = runs.checkpoint_path(p, job.tag)
    if ckpt.exists():
        how = "resumed"
        step = runs.verify_checkpoint(ckpt)["step"]
        assert step in job.ckpt_steps, f"{job.name}: checkpoint at step {step}, not in {job.ckpt_steps}"
    elif bank.path_of(p, job.tag).exists() and job.tag == "second":
        how = "finished"  # killed after the bank took the prompt and the checkpoint went
    else:
        how = "restarted"  # killed before the first checkpoint
    assert how == job.leaves, f"{job.name}: {how}, not {job.leaves}"
    if how != "finished":
        ok(cli(*args, "--resume") if how == "resumed" else cli(*args))

    _sound(job.root, first_bytes if job.tag == "second" else None)
    p = proj.load(job.root)
    prompt, meta = bank.get(p, job.tag)
    want_prompt, want_best, want_task = expected[job.tag]
    assert torch.allclose(prompt, want_prompt, atol=1e-6, rtol=0), f"{job.name} ({how})"
    assert (meta.steps, meta.best_step) == (STEPS, want_best)
    assert p.tasks[job.tag] == want_task
    assert not runs.checkpoint_path(p, job.tag).exists()


# ---------------------------------------------------------------- two writers


@pytest.mark.slow  # two tune subprocesses
def test_two_tunes_on_one_project_one_gets_the_lock(base: Path, data_dir: Path, hook: Path, tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "p")
    release, holding = tmp_path / "release", tmp_path / "holding"
    # Whichever locks the project first waits inside its first checkpoint write, lock held, until `release`
    # exists: the other one certainly meets the lock, however the two processes are scheduled.
    hooked = _hooked(hook, "checkpoint.safetensors", mark=holding, wait_for=release)
    env = {**os.environ, **ONE_THREAD, **hooked}
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-m", "ptcli", *_tune_args(tag, data_dir, steps=4), "-p", str(root), "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for tag in ("first", "second")
    }  # both start now
    # Until one holds the lock in its checkpoint write and the other has exited (or both have).
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        first_out = [tag for tag, proc in procs.items() if proc.poll() is not None]
        if len(first_out) == 2 or (first_out and holding.exists()):
            break
        time.sleep(0.05)
    release.touch()
    stderr = {tag: proc.communicate(timeout=DEADLINE)[1].decode() for tag, proc in procs.items()}
    codes = {tag: proc.returncode for tag, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], (codes, stderr)
    winner = next(t for t, c in codes.items() if c == 0)
    loser = next(t for t, c in codes.items() if c == 1)
    assert first_out == [loser] and holding.read_text() == str(procs[winner].pid)  # it exited while the lock was held
    holder = f"pid {procs[winner].pid} on {socket.gethostname()} (ptcli tune --tag {winner})"
    assert stderr[loser].startswith(f"error: project {root} is locked by {holder}\n"), stderr[loser]
    assert "hint: wait for that command to finish" in stderr[loser]

    result = cli("list-tags", "--json", "-p", root)
    ok(result)
    assert [e["tag"] for e in json.loads(result.stdout)] == [winner]
    p = proj.load(root)
    bank.get(p, winner)
    assert set(p.tasks) == {winner}
    assert not (root / "runs" / loser).exists()


def test_a_contender_names_a_holder_that_has_just_locked(tmp_path: Path) -> None:
    """The holder writes its name just after it locks; a contender that comes in between still gets the name.

    Two `tune`s started together meet exactly there: before the fix most such contenders said "locked by
    another process"."""
    import fcntl
    import threading

    fd = os.open(tmp_path / ".ptcli.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked, not yet signed
        signing = threading.Timer(0.05, lambda: os.pwrite(fd, b"pid 1 on host (ptcli tune --tag a)", 0))
        signing.start()
        with pytest.raises(ProjectError) as info, storage.project_lock(tmp_path, "ptcli tune --tag b"):
            pass
        signing.join()
    finally:
        os.close(fd)
    assert info.value.message == f"project {tmp_path} is locked by pid 1 on host (ptcli tune --tag a)"


def test_a_released_lock_names_nobody(tmp_path: Path) -> None:
    with storage.project_lock(tmp_path, "ptcli tune --tag a"):
        assert (
            tmp_path / ".ptcli.lock"
        ).read_text() == f"pid {os.getpid()} on {socket.gethostname()} (ptcli tune --tag a)"
    assert (tmp_path / ".ptcli.lock").read_text() == ""  # so a later contender never names a finished command


# ---------------------------------------------------------------- foreign files


class _Plant:
    """Unpickling this creates `marker`: proof that a pickle was run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_run(with_first: Path, data_dir: Path, tmp_path: Path) -> None:
    """A pickle where a prompt or a checkpoint should be: every command refuses it by name, none unpickles it."""
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Plant(probe))).close()
    assert probe.exists()  # the payload is live

    root = _copy(with_first, tmp_path / "p")
    marker = tmp_path / "pwned"
    evil = root / "bank" / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Plant(marker)))
    ckpt = root / "runs" / "second" / "checkpoint.safetensors"
    ckpt.parent.mkdir(parents=True)
    torch.save({"prompt": _Plant(marker)}, ckpt)
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt_tag": "evil", "text": "i love it"}) + "\n")

    assert failed(cli("list-tags", "-p", root), 1).startswith(
        f"error: prompt file {evil} is truncated or not a safetensors file"
    )
    assert failed(cli("infer", rows, "-p", root), 1).startswith(
        f"error: prompt file {evil} is truncated or not a safetensors file"
    )
    assert f"checkpoint {ckpt} is unreadable" in failed(cli(*_tune_args("second", data_dir), "--resume", "-p", root), 1)
    assert not marker.exists()
    assert not (root / "bank" / "second.safetensors").exists()


def test_a_directory_planted_in_the_bank_is_not_a_crash(with_first: Path, tmp_path: Path) -> None:
    root = _copy(with_first, tmp_path / "p")
    (root / "bank" / "odd.safetensors").mkdir()
    os.mkfifo(root / "bank" / "pipe.safetensors")  # must not hang list-tags
    result = cli("list-tags", "--json", "-p", root)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert [e["tag"] for e in json.loads(result.stdout)] == ["first"]


# ---------------------------------------------------------------- atomic_write when things fail


def _fail_with(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


class _FailingFile(io.FileIO):
    """A temp file whose write fails with `exc`, as on a full disk."""

    exc: BaseException = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, data) -> int:
        raise self.exc


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "ptcli.json"
    path.write_bytes(b'{"old": true}\n')
    return path


def test_failed_rename_keeps_the_old_file(old_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.os, "replace", _fail_with(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(ProjectError) as info:
        storage.atomic_write(old_file, b"new")
    monkeypatch.undo()
    assert info.value.message == f"input/output error: {old_file}; nothing was changed"
    assert old_file.read_bytes() == b'{"old": true}\n'
    assert os.listdir(old_file.parent) == ["ptcli.json"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_failed_write_says_why_and_keeps_the_old_file(
    old_file: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    monkeypatch.setattr(_FailingFile, "exc", OSError(code, os.strerror(code)))
    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: _FailingFile(fd, "wb"))
    with pytest.raises(ProjectError) as info:
        storage.atomic_write(old_file, b"new")
    monkeypatch.undo()
    assert info.value.message == f"{reason}: {old_file}; nothing was changed"
    assert "free space" in info.value.hint
    assert old_file.read_bytes() == b'{"old": true}\n'
    assert os.listdir(old_file.parent) == ["ptcli.json"]


def test_full_disk_before_the_temp_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.tempfile, "mkstemp", _fail_with(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(ProjectError, match="no space left on device"):
        storage.atomic_write(tmp_path / "bank" / "x.safetensors", b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "bank") == []


def test_interrupted_write_keeps_the_old_file(old_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FailingFile, "exc", KeyboardInterrupt())
    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: _FailingFile(fd, "wb"))
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(old_file, b"new")
    monkeypatch.undo()
    assert old_file.read_bytes() == b'{"old": true}\n'
    assert os.listdir(old_file.parent) == ["ptcli.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_does_not_change_permissions(tmp_path: Path) -> None:
    """A new file gets the mode `open()` would give it (not mkstemp's 0600); a rewritten file keeps its mode."""
    new = tmp_path / "new.json"
    storage.atomic_write(new, b"x")
    assert new.stat().st_mode & 0o777 == 0o666 & ~_umask()
    old = tmp_path / "old.json"
    old.write_bytes(b"x")
    old.chmod(0o640)
    storage.atomic_write(old, b"y")
    assert old.stat().st_mode & 0o777 == 0o640 and old.read_bytes() == b"y"


# ---------------------------------------------------------------- validation through the CLI


def _tune_first(root: Path, train: Path, valid: Path, *extra: str):
    return cli(
        "tune",
        "--tag",
        "first",
        "--train",
        train,
        "--valid",
        valid,
        "--max-steps",
        "2",
        "--val-check-interval",
        "2",
        "--batch-size",
        "4",
        "--max-seq-length",
        "64",
        *extra,
        "-p",
        root,
    )


def test_every_problem_in_a_training_file_is_reported(base: Path, data_dir: Path, tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "p")
    good = {"prompt_tag": "first", "text": "i love it", "answer": "positive"}
    lines = [
        b"\xef\xbb\xbf" + _line(good),  # 1: a byte-order mark is fine
        b"",  # 2: blank lines are skipped
        b'{"prompt_tag": "first", "text": "i love it"',
        _line(good),
        _line({"prompt_tag": "first", "text": "x"}),
        _line({**good, "id": 1}),
        _line({**good, "text": 5}),
        _line({**good, "answer": " "}),
        _line({**good, "prompt_tag": "second"}),
        b'{"prompt_tag": "first", "text": "caf\xe9", "answer": "positive"}',
        b"[1, 2]",
        _line({**good, "text": "a \ud800 b"}),
        b"[" * 100_000,
        b" \t ",  # 14: whitespace only: skipped
        _line(good),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\r\n".join(lines) + b"\r\n")
    expected = [
        (3, "invalid JSON ("),
        (5, "missing field 'answer'"),
        (6, "unexpected field(s) 'id'; rows have prompt_tag, text, answer"),
        (7, "field 'text' must be a string, got int"),
        (8, "field 'answer' is empty"),
        (9, "prompt_tag 'second' does not match the tag being tuned ('first')"),
        (10, "not UTF-8 (byte 36)"),
        (11, "expected a JSON object, got list"),
        (12, "field 'text' holds a lone surrogate '\\ud800', which is not valid Unicode"),
        (13, "invalid JSON (nested too deeply)"),
    ]
    before = _saved(root)
    err = failed(_tune_first(root, bad, data_dir / "first.jsonl"), 2)
    name = bad.resolve()
    assert err.splitlines()[0] == f"error: {name} has {len(expected)} problem(s)"
    reported = [line for line in err.splitlines() if line.startswith(f"  {name}:")]
    assert len(reported) == len(expected), err
    for line, (no, message) in zip(reported, expected):
        assert line.startswith(f"  {name}:{no}: {message}"), line
    assert _saved(root) == before
    assert not (root / "runs").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "blank lines only", "valid file with another tag"])
def test_unusable_data_files_exit_2_and_write_nothing(base: Path, data_dir: Path, tmp_path: Path, case: str) -> None:
    root = _copy(base, tmp_path / "p")
    train, valid = data_dir / "first.jsonl", tmp_path / "valid.jsonl"
    if case == "empty":
        valid.write_bytes(b"")
    elif case == "blank lines only":
        valid.write_bytes(b"\n \r\n\t\n")
    elif case == "valid file with another tag":
        valid = data_dir / "second.jsonl"
    expected = {
        "missing": f"error: data file {valid.resolve()} does not exist",
        "empty": f"  {valid.resolve()}: no data rows",
        "blank lines only": f"  {valid.resolve()}: no data rows",
        "valid file with another tag": f"  {valid.resolve()}:1: prompt_tag 'second' does not match "
        "the tag being tuned ('first')",
    }[case]
    before = _saved(root)
    err = failed(_tune_first(root, train, valid), 2)
    assert expected in err.splitlines()
    assert _saved(root) == before
    assert not (root / "runs").exists()


def test_only_the_first_20_problems_are_listed(base: Path, data_dir: Path, tmp_path: Path) -> None:
    root = _copy(base, tmp_path / "p")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        _line({"prompt_tag": "first", "text": "a", "answer": "b"}) + b"\n" + b"{oops\n" * (MAX_REPORTED + 7)
    )
    before = _saved(root)
    err = failed(_tune_first(root, bad, data_dir / "first.jsonl"), 2)
    listed = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(listed) == MAX_REPORTED + 1
    assert all(
        line.startswith(f"  {bad.resolve()}:{n}: invalid JSON (") for line, n in zip(listed, range(2, 2 + MAX_REPORTED))
    )
    assert listed[-1] == "  ... and 7 more problems"
    assert err.splitlines()[0] == f"error: {bad.resolve()} has {MAX_REPORTED + 7} problem(s)"
    assert _saved(root) == before


def test_infer_input_is_validated_too(base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(
        _line({"prompt_tag": "first", "text": "a", "id": 1}) + b"\n" + _line({"prompt_tag": "first"}) + b"\n\xff\n"
    )
    result = cli("infer", bad, "-p", base)
    err = failed(result, 2)
    assert result.stdout == ""
    assert (
        f"  {bad}:2: missing field 'text'" in err.splitlines() and f"  {bad}:3: not UTF-8 (byte 0)" in err.splitlines()
    )


def test_long_texts_are_cut_from_the_left_and_counted(base: Path, tmp_path: Path, tiny_tokenizer) -> None:
    root = _copy(base, tmp_path / "p")
    long = "the movie was great and i loved it , a positive review . the food was terrible and i hated it"
    train = [("i love it", "positive"), (long, "positive"), ("i hate it", "negative"), (long + " again", "negative")]
    valid = [(long, "positive"), ("i adore this", "positive")]
    paths = {}
    for name, pairs in (("train", train), ("valid", valid)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps({"prompt_tag": "first", "text": t, "answer": a}) + "\n" for t, a in pairs)
        )
    max_len = 24

    def cut(text: str, answer: str) -> bool:
        n_answer = len(tiny_tokenizer(" " + answer, add_special_tokens=False).input_ids) + 1  # + eos
        return len(tiny_tokenizer(text, add_special_tokens=False).input_ids) > max_len - P - n_answer

    n_cut = sum(cut(t, a) for t, a in train + valid)
    assert n_cut == 3
    result = _tune_first(root, paths["train"], paths["valid"], "--max-seq-length", str(max_len))
    ok(result)
    assert f"cut {n_cut} long text(s) from the left to fit --max-seq-length" in result.stderr
    assert bank.tags(proj.load(root)) == ["first"]


def test_an_answer_too_long_to_fit_names_its_file_and_line(
    base: Path, data_dir: Path, tmp_path: Path, tiny_tokenizer
) -> None:
    root = _copy(base, tmp_path / "p")
    train = tmp_path / "train.jsonl"
    rows = [("i love it", "positive"), ("i hate it", "entailment entailment"), ("i like it", "positive")]
    train.write_text("".join(json.dumps({"prompt_tag": "first", "text": t, "answer": a}) + "\n" for t, a in rows))
    n_answer = len(tiny_tokenizer(" entailment entailment", add_special_tokens=False).input_ids) + 1
    max_len = P + 4
    assert n_answer + P > max_len
    before = _saved(root)
    err = failed(_tune_first(root, train, data_dir / "first.jsonl", "--max-seq-length", str(max_len)), 2)
    assert err.startswith(
        f"error: {train.resolve()}:2: the answer alone ({n_answer} tokens) plus the prompt ({P}) "
        f"exceed --max-seq-length {max_len}"
    )
    assert _saved(root) == before
