"""`tune --log-with`: accelerate's trackers get the run's settings, every step and every validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clihelp import cli, failed, ok

from ptcli.tuning import trackers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = [("i love it", "positive"), ("i hate it", "negative"), ("i adore this", "positive"), ("i loathe it", "negative")]


def _tune(root: Path, tags: list[str], *extra) -> list:
    steps = ["--max-steps", 4, "--val-check-interval", 2, "--batch-size", 2, "--max-seq-length", 64]
    return ["tune", *(a for t in tags for a in ("--tag", t)), *steps, "-q", "-p", root, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d, out = tmp_path_factory.mktemp("data"), {}
    for tag in ("a", "b"):
        out[tag] = d / f"{tag}.jsonl"
        out[tag].write_text("".join(json.dumps({"prompt_tag": tag, "text": t, "answer": a}) + "\n" for t, a in ROWS))
    return out


@pytest.fixture
def root(tmp_path: Path, lively_llama: Path) -> Path:
    root = tmp_path / "p"
    ok(cli("init", root, "--base", lively_llama, "--num-prompt-tokens", 4, "-q"))
    return root


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files (not the hparams subfolder): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {k: [(e.step, e.value) for e in events.Scalars(k)] for k in events.Tags()["scalars"]}


def _log(root: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / tag / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_step_and_validation_as_the_run_log(
    root: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    a = ["--train", data["a"], "--valid", data["a"]]
    ok(cli(*_tune(root, ["a"], *a, "--log-with", "tensorboard", "--log-dir", tmp_path / "tb")))
    scalars = _scalars(tmp_path / "tb" / "p-a")
    log = _log(root, "a")
    steps = [h for h in log if "lr" in h]
    assert [s for s, _ in scalars["loss"]] == [h["step"] for h in steps] == [1, 2, 3, 4]
    for name in ("loss", "lr"):
        assert [v for _, v in scalars[name]] == pytest.approx([h[name] for h in steps], rel=1e-6)
    assert len(scalars["tokens_per_s"]) == 4 and all(v > 0 for _, v in scalars["tokens_per_s"])
    validations = [h for h in log if "lr" not in h]
    assert [h["step"] for h in validations] == [2, 4]
    assert scalars["val_acc"][1:] == [(h["step"], pytest.approx(h["val_acc"])) for h in validations]
    assert scalars["val_acc"][0][0] == 0  # the initial prompt's validation, at step 0
    hparams = next((tmp_path / "tb" / "p-a").glob("*/hparams.yml")).read_text()
    assert "max_steps: 4" in hparams and "tags: a" in hparams


def test_a_two_tag_run_names_each_tags_metrics_and_add_task_records_the_tracker(
    root: Path, data: dict[str, Path]
) -> None:
    for tag in ("a", "b"):
        files = ["--train", data[tag], "--valid", data[tag]]
        ok(cli("add-task", tag, *files, "--log-with", "tensorboard", "-q", "-p", root))
    ok(cli(*_tune(root, ["a", "b"])))
    scalars = _scalars(root / "runs" / "trackers" / "p-a+b")  # the default --log-dir
    assert {"loss", "lr", "val_acc/a", "val_acc/b", "val_loss/a", "val_loss/b"} <= set(scalars)
    assert "val_acc" not in scalars
    for tag in ("a", "b"):
        validations = [h for h in _log(root, tag) if "lr" not in h]
        assert scalars[f"val_acc/{tag}"][1:] == [(h["step"], pytest.approx(h["val_acc"])) for h in validations]


def test_a_missing_tracker_package_is_refused_before_any_work(
    root: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trackers, "find_spec", lambda name: None)
    err = failed(cli(*_tune(root, ["a"], "--train", data["a"], "--valid", data["a"], "--log-with", "tensorboard")), 2)
    assert "--log-with tensorboard needs the 'tensorboard' package" in err
    assert "pip install 'ptcli[tensorboard]'" in err
    err = failed(
        cli(*_tune(root, ["a"], "--train", data["a"], "--valid", data["a"], "--log-with", "tensorboard,wandb")), 2
    )
    assert "pip install 'ptcli[tensorboard]'" in err
    assert not (root / "runs").exists()


def test_an_unknown_tracker_names_the_flag(root: Path, data: dict[str, Path]) -> None:
    err = failed(
        cli(*_tune(root, ["a"], "--train", data["a"], "--valid", data["a"], "--log-with", "tensorboard,nope")), 2
    )
    assert "--log-with takes trackers among tensorboard, wandb, mlflow" in err and "got nope" in err


class _StopAt:
    """A Reporter whose step() raises KeyboardInterrupt at `stop_at`, as Ctrl-C would."""

    def __init__(self, stop_at: int):
        self.stop_at = stop_at

    def status(self, message: str) -> None:
        pass

    def start(self, total: int, done: int) -> None:
        pass

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        if step == self.stop_at:
            raise KeyboardInterrupt

    def evaluated(self, step: int, metrics: dict[str, float], tag: str | None = None) -> None:
        pass


def test_a_run_interrupted_without_a_tracker_resumes_logging_to_one(
    root: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """Where a run is watched is no setting of its prompt: the resume check lets it change."""
    from ptcli.api import Project

    settings = {"train": str(data["a"]), "valid": str(data["a"]), "max_steps": 4, "val_check_interval": 2}
    settings |= {"batch_size": 2, "max_seq_length": 64}
    with pytest.raises(KeyboardInterrupt):
        Project.open(root).tune("a", reporter=_StopAt(3), **settings)  # the checkpoint of step 2 stays
    ok(
        cli(
            *_tune(
                root,
                ["a"],
                "--resume",
                "--train",
                data["a"],
                "--valid",
                data["a"],
                "--log-with",
                "tensorboard",
                "--log-dir",
                tmp_path / "tb",
            )
        )
    )
    scalars = _scalars(tmp_path / "tb" / "p-a")
    assert [s for s, _ in scalars["loss"]] == [3, 4] and [s for s, _ in scalars["val_acc"]] == [4]


def _same_as_log(got: dict[str, list[tuple[int, float]]], root: Path, tag: str) -> None:
    """A tracker's scalars ({name: [(step, value)]}) are the run log's: every step's loss and lr, each validation."""
    log = _log(root, tag)
    steps, validations = [h for h in log if "lr" in h], [h for h in log if "lr" not in h]
    for name in ("loss", "lr"):
        assert got[name] == [(h["step"], pytest.approx(h[name], rel=1e-6)) for h in steps]
    assert [s for s, _ in got["tokens_per_s"]] == [h["step"] for h in steps]
    assert got["val_acc"][1:] == [(h["step"], pytest.approx(h["val_acc"])) for h in validations]
    assert got["val_acc"][0][0] == 0 and [s for s, _ in got["val_loss"]] == [0, 2, 4]


def test_mlflow_store_holds_every_step_and_validation(
    root: Path, data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = ["--train", data["a"], "--valid", data["a"]]
    ok(cli(*_tune(root, ["a"], *a, "--log-with", "mlflow", "--log-dir", tmp_path / "ml")))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")  # the store under --log-dir
    (experiment,) = [e for e in client.search_experiments() if e.name == "p-a"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["mlflow.runName"] == "p-a" and run.data.params["max_steps"] == "4"
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    _same_as_log({k: sorted(v) for k, v in history.items()}, root, "a")


def test_wandb_offline_run_holds_every_step_and_validation(
    root: Path, data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    a = ["--train", data["a"], "--valid", data["a"]]
    ok(cli(*_tune(root, ["a"], *a, "--log-with", "wandb", "--log-dir", tmp_path / "wb")))
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")  # the run folder under --log-dir
    got: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, []).append((items["_step"], v))
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "run":
            assert record.run.display_name == "p-a"
    _same_as_log(got, root, "a")
    assert config["max_steps"] == 4 and config["tags"] == "a"


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline wandb run file.

    The file is a LevelDB-style log (what wandb's own reader, now inside wandb-core, scans): a 7-byte
    header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each (crc32, length, type)
    and its bytes; a record is one FULL chunk or FIRST, MIDDLE..., LAST. A block's tail under 7 bytes is padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, at, block = [], b"", 7, 32768
    while at + 7 <= len(data):
        if block - at % block < 7:  # padding at the block's end
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        chunk, at = data[at + 7 : at + 7 + length], at + 7 + length
        if kind == 0 and length == 0:
            break  # zeroes: past the last record
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
