"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and Trackio, through accelerate's tracker classes.

Every backend gets the same records as ``metrics.jsonl`` (which is always written) plus the resolved config as
hyperparameters. Defaults are offline and local, so a run needs no account and no network: TensorBoard event
files, W&B in offline mode, an MLflow SQLite store and Trackio's SQLite store, all under ``RUN_DIR/tracking/``.
The run name and output dir are linked both ways: the trackers get ``output_dir`` as a hyperparameter, and
``RUN_DIR/tracking.json`` says where each backend put this run.

Only the main process (rank 0) creates a :class:`Trackers`. Tracker libraries are imported only when asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Environment variables whose values are secrets: they are never written into a run directory.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "TRACKIO_WRITE_TOKEN",
)


def redact(text: str) -> str:
    """``text`` with the value of every secret environment variable replaced by ``***``."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6 and value in text:
            text = text.replace(value, "***")
    return text


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.lr": 0.0002, ...}`` with scalar values, as every backend's hparams accept."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float)):
            out[name] = value
        elif value is None:
            out[name] = "null"
        else:
            out[name] = redact(value if isinstance(value, str) else json.dumps(value))
    return out


class Trackers:
    """The configured backends of one run; ``log`` sends a record to all of them.

    Args:
        backends: Names among ``tensorboard``, ``wandb``, ``mlflow``, ``trackio``.
        project: Project (W&B, Trackio) / experiment (MLflow) name; TensorBoard's subfolder.
        run_name: The run's name in every backend.
        run_dir: The run directory (linked from every backend).
        tracking_dir: Where local tracker files go.
        wandb_mode: ``offline`` (default) or ``online``.
        mlflow_tracking_uri: MLflow store; default: ``sqlite:///TRACKING_DIR/mlflow.db``.
        resume: A resumed run continues the same tracker runs where the backend allows it (MLflow, W&B, Trackio).
        logged_through: Steps up to this one were sent before an interruption; a resumed run replays them from its
            checkpoint with the same values and must not send them again (MLflow would store them twice, W&B
            refuses steps that go backwards).
    """

    def __init__(
        self,
        backends: list[str],
        *,
        project: str,
        run_name: str,
        run_dir: Path,
        tracking_dir: Path,
        wandb_mode: str = "offline",
        mlflow_tracking_uri: str | None = None,
        resume: bool = False,
        logged_through: int = 0,
    ) -> None:
        self.backends, self.project, self.run_name = list(backends), project, run_name
        self.run_dir, self.dir = Path(run_dir).resolve(), Path(tracking_dir).resolve()
        self.wandb_mode, self.resume, self.logged_through = wandb_mode, resume, logged_through
        # SQLite: MLflow's recommended local store (its plain-file store is in maintenance mode and refused).
        self.mlflow_uri = mlflow_tracking_uri or f"sqlite:///{self.dir / 'mlflow.db'}"
        self.trackers: list[Any] = []
        self.where: dict[str, dict[str, Any]] = {}
        self._links = self.run_dir / "tracking.json"

    def start(self, hparams: dict[str, Any]) -> None:
        """Open a run in every backend and log ``hparams`` (flattened resolved config) to it."""
        if not self.backends:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self._previous() if self.resume else {}
        values = {**flatten(hparams), "output_dir": str(self.run_dir), "run_name": self.run_name}
        for name in self.backends:
            tracker = getattr(self, f"_start_{name}")(previous.get(name, {}))
            tracker.store_init_configuration(values)
            self.trackers.append(tracker)
        self._write_links()

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        """Send the numeric values of a metrics record (``step`` is the x axis, not a metric)."""
        if not self.trackers:
            return
        step = record.get("step", step)
        if step is not None and step <= self.logged_through:
            return
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if not values:
            return
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    # --- one method per backend ---------------------------------------------------------------------------------

    def _start_tensorboard(self, previous: dict[str, Any]) -> Any:
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(self.project, str(self.dir / "tensorboard"))
        tracker.start()
        self.where["tensorboard"] = {"logdir": tracker.logging_dir}
        return tracker

    def _start_wandb(self, previous: dict[str, Any]) -> Any:
        from accelerate.tracking import WandBTracker

        if self.wandb_mode == "offline":
            os.environ["WANDB_MODE"] = "offline"  # also read by wandb's service process
        kwargs: dict[str, Any] = {"name": self.run_name, "dir": str(self.dir), "mode": self.wandb_mode}
        if previous.get("id"):
            kwargs.update(id=previous["id"], resume="allow")
        tracker = WandBTracker(self.project, **kwargs)
        tracker.start()
        run = tracker.run
        self.where["wandb"] = {"id": run.id, "dir": str(Path(run.dir).parent), "mode": self.wandb_mode}
        return tracker

    def _start_mlflow(self, previous: dict[str, Any]) -> Any:
        import mlflow
        from accelerate.tracking import MLflowTracker

        mlflow.set_tracking_uri(self.mlflow_uri)
        tracker = MLflowTracker(
            self.project,
            logging_dir=self.dir.joinpath("mlartifacts").as_uri(),  # else ./mlartifacts in the working directory
            run_id=previous.get("run_id"),
            run_name=self.run_name,
            tags={"bittune.output_dir": str(self.run_dir)},
        )
        tracker.start()
        run_id = tracker.active_run.info.run_id
        self.where["mlflow"] = {"tracking_uri": self.mlflow_uri, "experiment": self.project, "run_id": run_id}
        return tracker

    def _start_trackio(self, previous: dict[str, Any]) -> Any:
        import sys

        # Trackio reads its store location once, at import: point it under the run unless the user chose one.
        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(self.dir / "trackio"))
        from accelerate.tracking import TrackioTracker

        tracker = TrackioTracker(self.project, name=self.run_name, resume="allow" if self.resume else "never")
        tracker.start()
        from trackio.utils import TRACKIO_DIR

        self.where["trackio"] = {"dir": str(TRACKIO_DIR), "project": self.project, "run": self.run_name}
        return tracker

    # --- the run dir -> tracker link ----------------------------------------------------------------------------

    def _previous(self) -> dict[str, Any]:
        try:
            return json.loads(self._links.read_text()).get("backends", {})
        except (OSError, ValueError):
            return {}

    def _write_links(self) -> None:
        from bittune.storage import atomic_write_text

        links = {"project": self.project, "run_name": self.run_name, "backends": self.where}
        atomic_write_text(self._links, redact(json.dumps(links, indent=2)))
