"""``visionlora tune``: a search over LoRA settings on the user's data, by successive halving, with the
trials of each rung trained packed over one base (``train-many``).

The space starts from the task's preset and the usual advice (rank 4-32, alpha 1-4x the rank, learning
rate 5e-5 to 1e-3 around the preset's, the preset's target modules or those plus the key projection,
dropout 0-0.1, plain LoRA); a YAML ``space`` narrows or widens any of them. Trial 0 is the preset itself,
so the best is compared with it on equal terms.

Rungs: every trial trains a few epochs; the best ``1/eta`` of them (by the validation metric) train again
for ``eta`` times as many, and so on up to ``--epochs``. Each rung is one ``train-many`` of whole runs
(each with its own full schedule), so a rung that is killed resumes as ``train-many`` does. The test
part of the data, if any, is used only by the best settings' final run at ``DIR/best``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visionlora.artifacts import RunPaths, atomic_write_bytes, atomic_write_json, read_json, rows_csv
from visionlora.config import TrainConfig, coerce
from visionlora.data.splits import NO_TEST
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task
from visionlora.training.engine import train
from visionlora.training.many import PLAN_FILE, Say, load_plan, outcome_table, train_many, write_jobs_csv
from visionlora.training.packing import Job, Outcome

STATE_FILE = "tune.json"
LEADERBOARD = "leaderboard.csv"
PLOT = "tune.png"
Runner = Callable[[list[Job], Path, Say, bool], list[Outcome]]  # trains jobs into a folder: their outcomes
SEARCHED = ("lora_r", "alpha_ratio", "lr", "target_modules", "lora_dropout", "method")


def default_space(cfg: TrainConfig) -> dict[str, Any]:
    """The search space around the task's preset: lists are choices, ``{low, high}`` a log-uniform range."""
    lr = float(cfg.lr or 2e-4)
    targets = list(cfg.target_modules or [])
    key = "k_proj" if any(name.endswith("_proj") for name in targets) else "key"
    return {
        "lora_r": [4, 8, 16, 32],
        "alpha_ratio": [1, 2, 4],
        "lr": {"low": min(5e-5, lr / 4), "high": max(1e-3, lr * 4)},
        "target_modules": [targets, [*targets, key]] if key not in targets else [targets],
        "lora_dropout": [0.0, 0.05, 0.1],
        "method": ["lora"],
    }


def read_space(path: str | Path, space: dict[str, Any]) -> dict[str, Any]:
    """``space`` with the settings a YAML file gives replaced (a list of choices, one value, or a range)."""
    import yaml

    try:
        given = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise VisionLoraError(f"--space {path}: cannot read it as YAML ({type(err).__name__})") from None
    given = given.get("space", given) if isinstance(given, dict) else given
    if not isinstance(given, dict):
        raise VisionLoraError(f"--space {path}: expected a mapping of setting: choices")
    unknown = sorted(set(given) - set(SEARCHED))
    if unknown:
        raise VisionLoraError(f"--space {path}: unknown setting {unknown[0]!r}; searched: {', '.join(SEARCHED)}")
    for name, value in given.items():
        if isinstance(value, dict) and not {"low", "high"} <= set(value):
            raise VisionLoraError(f"--space {path}: {name}: a range needs low and high")
        space[name] = value if isinstance(value, (list, dict)) else [value]
    return space


@dataclass
class Trial:
    number: int
    settings: dict[str, Any]  # the searched values
    metrics: dict[str, float] = field(default_factory=dict)  # rung epochs (as text) -> the validation metric
    losses: dict[str, float] = field(default_factory=dict)  # rung epochs (as text) -> the validation loss
    status: str = "running"
    error: str | None = None

    @property
    def name(self) -> str:
        return f"trial{self.number:03d}"


def preset_settings(cfg: TrainConfig) -> dict[str, Any]:
    r = int(cfg.lora_r or 16)
    return {"lora_r": r, "alpha_ratio": float(cfg.lora_alpha or 2 * r) / r, "lr": float(cfg.lr or 2e-4),
            "target_modules": list(cfg.target_modules or []), "lora_dropout": cfg.lora_dropout, "method": cfg.method}


def sample_trials(space: dict[str, Any], count: int, preset: dict[str, Any], seed: int) -> list[Trial]:
    """``count`` trials: the preset first, then seeded random draws from ``space``."""
    rng = random.Random(seed)
    trials = [Trial(0, dict(preset))]
    while len(trials) < count:
        settings = {name: _draw(rng, space[name]) for name in SEARCHED}
        trials.append(Trial(len(trials), settings))
    return trials


def _draw(rng: random.Random, choices: Any) -> Any:
    if isinstance(choices, dict):
        low, high = math.log(float(choices["low"])), math.log(float(choices["high"]))
        return float(f"{math.exp(rng.uniform(low, high)):.3g}")
    return rng.choice(choices)


def rung_epochs(epochs: int, trials: int, eta: int) -> list[int]:
    """The epochs of each rung, shortest first, ending at ``epochs``: one rung per ``eta``-fold cut of the
    trials (while more than one is left), each ``eta`` times longer than the one before."""
    levels = 1
    while math.ceil(trials / eta ** levels) > 1:
        levels += 1
    return sorted({max(1, epochs // eta ** level) for level in range(levels)})


def trial_config(base: TrainConfig, trial: Trial, epochs: int, output: Path) -> TrainConfig:
    """The settings of ``trial`` for one rung: its searched values over ``base``; no test part."""
    s = trial.settings
    values = {"lora_r": int(s["lora_r"]), "lora_alpha": float(s["alpha_ratio"]) * int(s["lora_r"]),
              "lr": float(s["lr"]), "target_modules": coerce("target_modules", s["target_modules"]),
              "lora_dropout": float(s["lora_dropout"]), "method": str(s["method"])}
    return dataclasses.replace(base, **values, epochs=epochs, test_data=NO_TEST, output=str(output),
                               progress=False, overwrite=True).validate()


# -- the search ----------------------------------------------------------------------------------
@dataclass
class TuneState:
    """Everything a tune needs to continue: the settings, the trials and the rungs done."""

    base: dict[str, Any]
    rungs: list[int]
    eta: int
    trials: list[Trial]
    rungs_done: int = 0

    def save(self, output: Path) -> None:
        atomic_write_json(output / STATE_FILE, {**dataclasses.asdict(self)})

    @classmethod
    def load(cls, output: Path) -> TuneState:
        if not (output / STATE_FILE).is_file():
            raise VisionLoraError(f"{output}: nothing to resume (no {STATE_FILE}; was it made by tune?)")
        data = read_json(output / STATE_FILE)
        data["trials"] = [Trial(**trial) for trial in data["trials"]]
        return cls(**data)


def tune(state: TuneState, output: Path, say: Say = print, resuming: bool = False,
         runner: Runner = train_many) -> dict[str, Any]:
    """Run the rungs not yet done (each with ``runner``: ``train_many`` here, or spread over a Ray cluster),
    then train the best settings to the end at ``output/best``; write the leaderboard and the plot. Returns
    what the best is and how it compares with the preset."""
    base = TrainConfig.from_dict(state.base)
    task = get_task(base.task)
    alive = [t for t in state.trials if t.status == "running"]
    for index, epochs in enumerate(state.rungs):
        if index < state.rungs_done:
            continue
        alive = _run_rung(base, state, index, epochs, alive, output, say, resuming, runner)
        keep = max(1, math.ceil(len(alive) / state.eta)) if index + 1 < len(state.rungs) else 1
        ranked = sorted(alive, key=lambda t: _rank(t, str(epochs), task.greater_is_better))
        for trial in ranked[keep:]:
            trial.status = f"stopped at {epochs} epochs"
        alive = ranked[:keep]
        state.rungs_done = index + 1
        state.save(output)
        write_leaderboard(output, state, task.main_metric)
    if not alive:
        raise VisionLoraError("every trial failed; see the leaderboard's errors")
    best = alive[0]
    best.status = "best"
    state.save(output)
    write_leaderboard(output, state, task.main_metric)
    _best_run(base, state, best, output, say)
    save_tune_plot(output / PLOT, state, task.main_metric)
    return compare_with_preset(state, best, task.main_metric, task.greater_is_better)


def _run_rung(base: TrainConfig, state: TuneState, index: int, epochs: int, alive: list[Trial], output: Path,
              say: Say, resuming: bool, runner: Runner) -> list[Trial]:
    """Train the ``alive`` trials for ``epochs`` epochs, packed; record their metrics; the ones that finished.
    Runs of the rungs before the last leave their figures out: only their metric is read."""
    folder = output / f"rung{index + 1}-{epochs}ep"
    say(f"rung {index + 1}/{len(state.rungs)}: {len(alive)} trials x {epochs} epochs")
    if resuming and (folder / PLAN_FILE).is_file():
        jobs = load_plan(folder)
    else:
        last = index + 1 == len(state.rungs)  # its runs may become the best: drawn in full
        jobs = [Job(t.name, dataclasses.replace(trial_config(base, t, epochs, folder / t.name), figures=last))
                for t in alive]
    outcomes = runner(jobs, folder, say, resuming and (folder / PLAN_FILE).is_file())
    write_jobs_csv(folder, outcomes)
    say(outcome_table(outcomes))
    by_name = {o.name: o for o in outcomes}
    finished = []
    for trial in alive:
        outcome = by_name.get(trial.name)
        if outcome is None or outcome.value is None:
            trial.status, trial.error = "failed", outcome.error if outcome else "no outcome"
            continue
        trial.metrics[str(epochs)] = float(outcome.value)
        trial.losses[str(epochs)] = float(outcome.metrics.get("loss", math.inf))
        finished.append(trial)
    return finished


def _rank(trial: Trial, epochs: str, greater_is_better: bool) -> tuple[float, float]:
    """Sort key, best first: the main metric, then (on a tie) the lower validation loss."""
    value = trial.metrics[epochs]
    return (-value if greater_is_better else value, trial.losses.get(epochs, math.inf))


def _best_run(base: TrainConfig, state: TuneState, best: Trial, output: Path, say: Say) -> None:
    """The best settings as a normal run folder at ``output/best``: the last rung's run when the data has no
    test part (the same run), else trained again with it."""
    last = output / f"rung{len(state.rungs)}-{state.rungs[-1]}ep" / best.name
    target = output / "best"
    settings = trial_config(base, best, state.rungs[-1], target)
    cfg = dataclasses.replace(settings, test_data=base.test_data, progress=base.progress)
    if not get_task(base.task).data.read_data(cfg).test and RunPaths(last, "lora").completed():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(last, target)
        say(f"best: {best.name} -> {target} (its last rung's run)")
        return
    say(f"best: {best.name}, trained again with the test part -> {target}")
    train(cfg)


def compare_with_preset(state: TuneState, best: Trial, metric: str, greater_is_better: bool) -> dict[str, Any]:
    """How the best differs from the preset (trial 0): the settings that differ, and the metric at the
    longest rung both reached."""
    preset = state.trials[0]
    common = [e for e in best.metrics if e in preset.metrics]
    epochs = max(common, key=int) if common else None
    changed = {k: (preset.settings[k], v) for k, v in best.settings.items() if preset.settings.get(k) != v}
    result: dict[str, Any] = {"best": best.name, "settings": best.settings, "changed": changed, "metric": metric}
    if epochs is not None:
        result.update(epochs=int(epochs), best_value=best.metrics[epochs], preset_value=preset.metrics[epochs])
    return result


def describe_comparison(comparison: dict[str, Any]) -> str:
    """One line: what the best changed from the preset, and by how much the metric moved."""
    if comparison["best"] == "trial000":
        return "the preset's own settings were the best"
    changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in comparison["changed"].items())
    if "epochs" not in comparison:
        return f"best {comparison['best']} ({changed}); the preset stopped before it could be compared"
    delta = comparison["best_value"] - comparison["preset_value"]
    return (f"best {comparison['best']} changes {changed}: {comparison['metric']} "
            f"{comparison['best_value']:.4f} against the preset's {comparison['preset_value']:.4f} "
            f"({delta:+.4f}) after {comparison['epochs']} epochs")


# -- outputs -------------------------------------------------------------------------------------
def leaderboard_rows(output: Path, state: TuneState, metric: str) -> list[dict[str, Any]]:
    rows = []
    for trial in state.trials:
        row: dict[str, Any] = {"trial": trial.name, "status": trial.status, **trial.settings}
        row["target_modules"] = "+".join(trial.settings["target_modules"])
        for epochs in state.rungs:
            row[f"{metric}@{epochs}ep"] = trial.metrics.get(str(epochs), "")
        row["adapter_bytes"] = _adapter_bytes(output, state, trial)
        row["error"] = trial.error or ""
        rows.append(row)
    return rows


def _adapter_bytes(output: Path, state: TuneState, trial: Trial) -> int | str:
    for index in reversed(range(len(state.rungs))):
        folder = output / f"rung{index + 1}-{state.rungs[index]}ep" / trial.name / "trained_model_lora"
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            return weights.stat().st_size
    return ""


def write_leaderboard(output: Path, state: TuneState, metric: str) -> Path:
    path = output / LEADERBOARD
    atomic_write_bytes(path, rows_csv(leaderboard_rows(output, state, metric)).encode())
    return path


def save_tune_plot(path: Path, state: TuneState, metric: str) -> None:
    """The validation metric of every trial (at the longest rung it reached) against each searched setting."""
    from visionlora.core.plots import figure_png, subplots

    figure, axes = subplots(1, len(SEARCHED), figsize=(3.2 * len(SEARCHED), 3.2), sharey=True)
    reached = [(t, max(t.metrics, key=int)) for t in state.trials if t.metrics]
    for axis, name in zip(axes, SEARCHED):
        values = [_plotted(t.settings[name]) for t, _ in reached]
        scores = [t.metrics[e] for t, e in reached]
        sizes = [12 + 10 * state.rungs.index(int(e)) for _, e in reached]
        axis.scatter(values, scores, s=sizes, alpha=0.7)
        axis.set_xlabel(name)
        if name == "lr":
            axis.set_xscale("log")
        axis.tick_params(axis="x", labelrotation=45)
    axes[0].set_ylabel(f"validation {metric}")
    figure.suptitle("each trial at the longest rung it reached (bigger: longer)")
    atomic_write_bytes(path, figure_png(figure))


def _plotted(value: Any) -> Any:
    return "+".join(value) if isinstance(value, list) else value
