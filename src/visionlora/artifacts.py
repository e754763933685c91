"""The run folder's names, atomic writes and the history CSV.

Layout (``<suffix>`` is ``_lora`` in LoRA mode, empty in full mode)::

    <run>/trained_model<suffix>/      adapter or full weights, processor, visionlora.json
    <run>/training_results<suffix>/   history.csv, loss.png, metrics.png, train.log, training_summary.json
    <run>/base_model/                 the random base of a built-in model's LoRA run
    <run>/checkpoint/                 the training state while a run is unfinished

Everything is written under a temporary name and renamed into place (readable as the
user's umask allows), and the summary (with ``"completed": true``) is written last.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

from visionlora.errors import VisionLoraError

_UMASK_LOCK = threading.Lock()

INFO_FILE = "visionlora.json"


@dataclass(frozen=True)
class RunPaths:
    """Every name in a run folder (mode ``lora`` or ``full``), or in an export (mode ``export``)."""

    root: Path
    mode: str

    @property
    def suffix(self) -> str:
        return "_lora" if self.mode == "lora" else ""

    @property
    def model_dir(self) -> Path:
        return self.root if self.mode == "export" else self.root / f"trained_model{self.suffix}"

    @property
    def export_file(self) -> Path:
        return self.root / "export.json"

    @property
    def results_dir(self) -> Path:
        return self.root / f"training_results{self.suffix}"

    @property
    def base_dir(self) -> Path:
        return self.root / "base_model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def progress_file(self) -> Path:
        return self.checkpoint_dir / "progress.json"

    @property
    def tracking_dir(self) -> Path:
        """Where --report-to trackers write (TensorBoard events, an MLflow file store, W&B files)."""
        return self.root / "tracking"

    def frozen_weights(self, process: int = 0) -> Path:
        """A process's frozen base weights, kept at full precision while training stores them in bf16."""
        return self.root / f".frozen-weights-{process}.safetensors"

    @property
    def summary(self) -> Path:
        return self.results_dir / "training_summary.json"

    @property
    def history(self) -> Path:
        return self.results_dir / "history.csv"

    @property
    def per_class(self) -> Path:
        return self.results_dir / "per_class.csv"

    @property
    def predictions_grid(self) -> Path:
        return self.results_dir / "predictions.png"

    @property
    def report(self) -> Path:
        return self.results_dir / "report.html"

    @property
    def loss_plot(self) -> Path:
        return self.results_dir / "loss.png"

    @property
    def metrics_plot(self) -> Path:
        return self.results_dir / "metrics.png"

    @property
    def log_file(self) -> Path:
        return self.results_dir / "train.log"

    def completed(self) -> bool:
        """Whether the run finished (its summary, written last, exists), or the export is whole."""
        return (self.export_file if self.mode == "export" else self.summary).is_file()


def find_run(run_dir: str | Path) -> RunPaths:
    """The paths of an existing run, whichever mode it was trained in."""
    root = Path(run_dir)
    for mode in ("export", "lora", "full"):
        paths = RunPaths(root, mode)
        if (paths.model_dir / INFO_FILE).is_file():
            return paths
    if not root.is_dir():
        raise VisionLoraError(f"{root}: no such run folder")
    progress = RunPaths(root, "lora").progress_file
    if progress.is_file():
        state = read_json(progress)
        raise VisionLoraError(
            f"{root}: the run did not complete (stopped after epoch {state.get('completed_epochs')}, "
            f"batch {state.get('batches_done')}); continue it with: visionlora train --resume {root}"
        )
    raise VisionLoraError(f"{root}: not a finished run or export "
                          f"(no trained_model_lora/ or trained_model/ with {INFO_FILE})")


def new_run_dir(task: str, mode: str, output: str | None, overwrite: bool) -> Path:
    """``output`` if given (refusing to replace a non-empty folder unless asked), else the next free name."""
    if output:
        root = Path(output)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise VisionLoraError(f"{root}: output folder exists and is not empty; pass --overwrite to replace it")
            shutil.rmtree(root)
    else:
        parent = Path("runs") / task
        root = parent / mode
        number = 2
        while root.exists():
            root = parent / f"{mode}-{number}"
            number += 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-")
        probe.close()
    except OSError as err:
        raise VisionLoraError(f"{root}: cannot write the run folder: {err.strerror or err}") from None
    return root


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place
    (flushed to disk first unless not ``durable``, for files that can be rebuilt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # mkstemp makes it private (0600)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path`` (for libraries that only write to a
    path: HDF5, video encoders), then rename it into place; nothing is left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


class atomic_dir:
    """Context manager yielding a temporary folder that replaces ``path`` on success."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _readable_as_umask(self.tmp)  # some writers (safetensors shards) make private files
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)


def _readable_as_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the permissions the umask allows."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def save_model(model: Any, processor: Any, info_dict: dict[str, Any], target: Path, adapter: str = "default") -> None:
    """``model.save_pretrained`` (full weights, or of a peft model its adapter ``adapter``, saved as its
    only one), the processor and visionlora.json, written together into ``target``."""
    with atomic_dir(target) as tmp:
        if adapter == "default":
            model.save_pretrained(tmp, safe_serialization=True)
        else:  # peft writes an adapter other than "default" into a subfolder named after it
            model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter])
            for file in (tmp / adapter).iterdir():
                file.rename(tmp / file.name)
            (tmp / adapter).rmdir()
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info_dict)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VisionLoraError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise VisionLoraError(f"{path}: not valid JSON (line {err.lineno})") from None


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """A CSV of dict rows (epochs, classes); nested values (per-class tables) are left out."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
