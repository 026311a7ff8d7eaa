"""Trackers: every backend's files, read back with that library's own reader, hold the run's metrics and config.

One ``bittune train`` process logs to TensorBoard, W&B (offline), MLflow (SQLite) and Trackio (local) at once,
with hub and W&B tokens planted in its environment; none of them may appear in any file of the run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bittune.training.metrics import read_metrics
from tiny import color_chat_rows, run_config, write_jsonl

pytestmark = pytest.mark.e2e

TOKENS = {
    "HF_TOKEN": "hf_PLANTEDsecret0123456789abcdefXYZ",
    "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDlegacyhub0123456789abcdef",
    "WANDB_API_KEY": "PLANTEDwandbkey0123456789abcdef0123456789",
    "MLFLOW_TRACKING_TOKEN": "PLANTEDmlflowtoken0123456789",
    "MLFLOW_TRACKING_PASSWORD": "PLANTEDmlflowpassword0123456789",
    "TRACKIO_WRITE_TOKEN": "PLANTEDtrackiowrite0123456789",
}


def test_every_secret_variable_the_readme_names_is_planted_and_redacted():
    from bittune.tracking import SECRET_ENV

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    named = readme[readme.index("The values of `HF_TOKEN`") :].split("are never written", 1)[0]
    assert set(TOKENS) == set(SECRET_ENV) == {w.strip("`,") for w in named.split() if w.strip("`,").isupper()}


@pytest.fixture(scope="module")
def tracked_run(tiny_llama_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    data = write_jsonl(tmp / "chat.jsonl", color_chat_rows(32))
    raw = run_config(tiny_llama_dir, data, tmp / "run", train={"max_steps": 3, "lr": 1e-2})
    raw["data"]["eval_fraction"] = 0.25
    raw["tracking"] = {"backends": ["tensorboard", "wandb", "mlflow", "trackio"], "project": "colors"}
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **TOKENS, "HF_HUB_OFFLINE": "1"}
    for name in ("WANDB_MODE", "TRACKIO_DIR", "MLFLOW_TRACKING_URI"):  # the defaults must be offline by themselves
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for token in TOKENS.values():
        assert token not in proc.stdout + proc.stderr
    return tmp / "run"


def expected_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def links(run: Path) -> dict:
    return json.loads((run / "tracking.json").read_text())


def test_no_token_in_any_file_of_the_run(tracked_run):
    files = [f for f in tracked_run.rglob("*") if f.is_file()]
    assert len(files) > 10  # the trackers really wrote their files under the run
    for f in files:
        data = f.read_bytes()
        for token in TOKENS.values():
            assert token.encode() not in data, f


def test_links_between_run_dir_and_trackers(tracked_run):
    info = links(tracked_run)
    assert info["run_name"] == "run" and info["project"] == "colors"
    assert set(info["backends"]) == {"tensorboard", "wandb", "mlflow", "trackio"}
    assert info["backends"]["wandb"]["mode"] == "offline"
    assert info["backends"]["mlflow"]["tracking_uri"].startswith("sqlite:///")
    for where in (info["backends"]["tensorboard"]["logdir"], info["backends"]["trackio"]["dir"]):
        assert Path(where).resolve().is_relative_to(tracked_run.resolve())


def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(links(tracked_run)["backends"]["tensorboard"]["logdir"])
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged == pytest.approx(expected_losses(tracked_run), rel=1e-6)
    assert "eval_loss" in acc.Tags()["scalars"]


def test_mlflow_store_holds_metrics_and_hyperparameters(tracked_run):
    from mlflow.tracking import MlflowClient

    info = links(tracked_run)["backends"]["mlflow"]
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    history = {m.step: m.value for m in client.get_metric_history(info["run_id"], "loss")}
    assert history == pytest.approx(expected_losses(tracked_run), rel=1e-6)
    run = client.get_run(info["run_id"])
    assert run.data.params["train.lr"] == "0.01" and run.data.params["method"] == "lora"
    assert run.data.params["output_dir"] == str(tracked_run.resolve())
    assert run.data.tags["mlflow.runName"] == "run"
    assert client.get_experiment(run.info.experiment_id).name == "colors"


def read_wandb_records(path: Path) -> list:
    """Records of an offline ``.wandb`` file, decoded with W&B's own protobuf schema.

    wandb 0.31 has no Python reader of its run files any more (its core is in Go); the file is a LevelDB-style log
    (``:W&B`` header, 32 KiB blocks, 7-byte chunk headers) of ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_file_holds_metrics_and_config(tracked_run):
    run_dir = Path(links(tracked_run)["backends"]["wandb"]["dir"])
    assert run_dir.name.startswith("offline-run-")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = read_wandb_records(run_file)
    history = {}
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "loss" in items:
                history[int(items["_step"])] = items["loss"]
        elif kind == "config":
            config.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in r.config.update})
        elif kind == "run":
            assert r.run.display_name == "run" and r.run.project == "colors"
    assert history == pytest.approx(expected_losses(tracked_run), rel=1e-6)
    assert config["train.lr"] == 0.01 and config["output_dir"] == str(tracked_run.resolve())


def test_trackio_local_store_holds_the_metrics(tracked_run):
    info = links(tracked_run)["backends"]["trackio"]
    # Trackio fixes its store location at import: read it in a fresh interpreter pointed at the run's store.
    code = (
        "import json, sys\n"
        "from trackio.sqlite_storage import SQLiteStorage\n"
        "logs = SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({int(r['step']): r['loss'] for r in logs if 'loss' in r}))\n"
    )
    env = {**os.environ, "TRACKIO_DIR": info["dir"]}
    out = subprocess.run(
        [sys.executable, "-c", code, info["project"], info["run"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    logged = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert logged == pytest.approx(expected_losses(tracked_run), rel=1e-6)


def test_metrics_jsonl_is_written_without_any_tracker(tiny_llama_dir, tmp_path):
    from bittune.config import config_from_dict
    from bittune.recipes.finetune import train

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(16))
    result = train(config_from_dict(run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 2})))
    assert len(expected_losses(result.run_dir)) == 2
    assert not (result.run_dir / "tracking").exists() and not (result.run_dir / "tracking.json").exists()


@pytest.mark.parametrize("name", list(TOKENS))
def test_flatten_and_redact(monkeypatch, name):
    from bittune.tracking import flatten

    monkeypatch.setenv(name, "hf_secretvalue123")
    flat = flatten({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": "x hf_secretvalue123 y", "f": True})
    assert flat == {"a.b": 1, "a.c": "null", "a.d": "[1, 2]", "e": "x *** y", "f": True}


# A driver that makes the loss NaN on one forward pass (so the run stops there, as a crash would, after logging
# the steps before it), then runs the CLI. It patches micro_batch_loss: both loss paths of the step go through it.
POISONED_TRAIN = """
import sys
import bittune.training.loss as loss_module
real, calls = loss_module.micro_batch_loss, [0]
def poisoned(*args, **kwargs):
    calls[0] += 1
    total, task = real(*args, **kwargs)
    return (total * float("nan"), task) if calls[0] == int(sys.argv[2]) else (total, task)
loss_module.micro_batch_loss = poisoned
from bittune.cli import main
main(["train", sys.argv[1]])
"""


def wandb_history(tracking_dir: Path, run_id: str) -> list[int]:
    """The ``_step`` of every loss record in every offline W&B run file of ``run_id``, in file then log order."""
    steps = []
    for run_file in sorted(tracking_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in read_wandb_records(run_file):
            if r.WhichOneof("record_type") == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "loss" in items:
                    steps.append(int(items["_step"]))
    return steps


def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs_without_repeating_steps(tiny_llama_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    data = write_jsonl(tmp_path / "chat.jsonl", color_chat_rows(32))
    raw = run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 6, "save_every": 2})
    raw["tracking"] = {"backends": ["mlflow", "wandb"], "project": "colors"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Steps 1-3 are logged, step 4's loss is NaN: the run stops with checkpoints/step-2 as its last good state.
    first = subprocess.run(
        [sys.executable, "-c", POISONED_TRAIN, str(cfg), "4"], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 2 and "at step 4" in first.stderr, first.stderr[-3000:]
    run = tmp_path / "run"
    before = links(run)["backends"]
    proc = subprocess.run(
        [sys.executable, "-m", "bittune", "train", str(cfg), "--resume"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = links(run)["backends"]
    assert after["mlflow"]["run_id"] == before["mlflow"]["run_id"] and after["wandb"]["id"] == before["wandb"]["id"]

    # Steps 3 (replayed from checkpoint 2, with the same values) is not sent twice, and no step goes backwards.
    expected = expected_losses(run)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(tracking_uri=after["mlflow"]["tracking_uri"])
    history = [(m.step, m.value) for m in client.get_metric_history(after["mlflow"]["run_id"], "loss")]
    assert [s for s, _ in sorted(history, key=lambda h: h[0])] == [1, 2, 3, 4, 5, 6], history
    assert dict(history) == pytest.approx(expected, rel=1e-6)
    assert wandb_history(run / "tracking", after["wandb"]["id"]) == [1, 2, 3, 4, 5, 6]
