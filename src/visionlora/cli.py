"""The ``visionlora`` command: subcommands -> config -> engine, inference or demo."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from visionlora import __version__
from visionlora.errors import VisionLoraError


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except VisionLoraError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an unforeseen input: still one line, traceback with --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
              " (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _quiet_libraries() -> None:
    """Keep library deprecation chatter and per-file progress bars out of the user's terminal."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionlora",
        description="Fine-tune vision transformers with LoRA (or fully) on your own labelled images.",
    )
    parser.add_argument("--version", action="version", version=f"visionlora {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = commands.add_parser(
        "train", parents=[common], help="train a LoRA adapter or a full model", description=_train_description()
    )
    train.add_argument("--config", metavar="FILE", help="YAML file of settings (flags given here win)")
    train.add_argument(
        "--resume", nargs="?", const=True, metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (RUN_DIR, or the --output folder)",
    )
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train)

    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (they can run code)")
    loading.add_argument("--trust-remote-code", action="store_true", help="allow the base model to run its own code")

    evaluate = commands.add_parser("evaluate", parents=[common, loading], help="evaluate a finished run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holding trained_model_lora/ or trained_model/)")
    evaluate.add_argument("--data", help="labelled data to evaluate on (default: the run's validation split)")
    evaluate.add_argument("--output", metavar="FILE.json", help="also write the metrics here")
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = commands.add_parser("predict", parents=[common, loading], help="predict images with a finished run")
    predict.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    predict.add_argument("--output", metavar="FILE.json", help="write predictions here (default: print them)")
    predict.add_argument("--threshold", type=float, default=0.5, help="detection: lowest score kept (default 0.5)")
    predict.add_argument("--save-images", metavar="DIR", help="also save each image with its prediction drawn")
    predict.add_argument(
        "--boxes", metavar="FILE.json",
        help="pose: boxes per image, {\"image.jpg\": [[x0, y0, x1, y1], ...]} (default: the whole image)",
    )
    predict.set_defaults(handler=_cmd_predict)

    compare = commands.add_parser(
        "compare", parents=[common], help="LoRA vs full: train both on --data, or compare two finished runs",
        description="visionlora compare --task T --data PATH [training flags]   trains both modes alike; "
        "visionlora compare RUN_A RUN_B   compares two finished runs. Writes comparison.md/.json/.png.",
    )
    compare.add_argument("runs", nargs="*", metavar="RUN", help="two finished run folders (or none, with --data)")
    compare.add_argument("--config", metavar="FILE", help="YAML file of training settings (flags given here win)")
    _add_config_flags(compare)
    compare.set_defaults(handler=_cmd_compare)

    demo = commands.add_parser(
        "demo", parents=[common], help="train LoRA and full on a generated image set (offline, minutes on a CPU)"
    )
    demo.add_argument("--output", default="runs/demo", metavar="DIR", help="where the demo data and runs go")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _train_description() -> str:
    from visionlora.tasks import task_names

    return (
        "Train on --data and write runs/<task>/<name>/ (or --output). "
        f"Tasks: {', '.join(task_names())}. Every flag can also be set in the --config YAML file."
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so YAML and presets apply."""
    from visionlora.config import config_fields

    for fld in config_fields():
        flag = "--" + fld.name.replace("_", "-")
        kind = str(fld.type)
        extra: dict[str, Any] = {"default": argparse.SUPPRESS, "help": fld.metadata["help"], "dest": fld.name}
        if "bool" in kind:
            extra["action"] = argparse.BooleanOptionalAction
        else:
            extra["metavar"] = fld.name.upper()
            if "choices" in fld.metadata:
                extra["choices"] = fld.metadata["choices"]
        parser.add_argument(flag, **extra)


def _given_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(YAML values, flag values): only the settings the user actually gave."""
    from visionlora.config import config_fields, load_yaml

    names = {f.name for f in config_fields()}
    flags = {k: v for k, v in vars(args).items() if k in names}
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return yaml_values, flags


def config_from_args(args: argparse.Namespace):
    """Merge preset < YAML < flags into a TrainConfig."""
    from visionlora.config import build_config
    from visionlora.tasks import get_task

    yaml_values, flags = _given_settings(args)
    task_name = flags.get("task", yaml_values.get("task", "classification"))
    mode = flags.get("mode", yaml_values.get("mode", "lora"))
    preset = get_task(task_name).preset.settings(mode)
    return build_config(yaml_values, flags, preset)


def _cmd_train(args) -> int:
    from visionlora.config import coerce
    from visionlora.engine import resume, train

    if args.resume:
        yaml_values, flags = _given_settings(args)
        given = {k: coerce(k, v) for k, v in {**yaml_values, **flags}.items()}
        run_dir = args.resume if isinstance(args.resume, str) else given.get("output")
        if not run_dir:
            raise VisionLoraError("--resume needs the run folder: --resume RUN_DIR, or --output RUN_DIR --resume")
        result = resume(run_dir, given)
    else:
        result = train(config_from_args(args))
    if result.summary:
        metrics = result.summary["metrics"]
        main = result.summary["main_metric"]
        print(f"best epoch {result.summary['best_epoch']}: {main} {metrics[main]:.4f} -> {result.paths.root}")
    return 0


def _cmd_evaluate(args) -> int:
    from visionlora.inference import load_run

    result = load_run(args.run_dir, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code).evaluate(args.data)
    _emit(result, args.output)
    return 0


def _cmd_predict(args) -> int:
    from visionlora.inference import image_files, load_run

    run = load_run(args.run_dir, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    files = list(image_files(args.images))
    if not files:
        raise VisionLoraError(f"no image files found in: {' '.join(args.images)}")
    save = Path(args.save_images) if args.save_images else None
    options: dict[str, Any] = {"threshold": args.threshold}
    if args.boxes:
        options["boxes"] = _read_boxes(Path(args.boxes), files)
    predictions, skipped = run.predict_files(files, save_images=save, **options)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): " + "; ".join(f"{s['file']} ({s['reason']})" for s in skipped), file=sys.stderr)
    _emit(predictions, args.output)
    return 0


def _read_boxes(path: Path, files: list[Path]) -> list[list[list[float]] | None]:
    """Boxes for each file from a JSON mapping of image path (or file name) to box lists."""
    from visionlora.artifacts import read_json

    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise VisionLoraError(f"{path}: expected a mapping of image file to a list of [x0, y0, x1, y1] boxes")
    boxes = []
    for file in files:
        entry = mapping.get(str(file), mapping.get(file.name))
        if entry is not None and not (
            isinstance(entry, list) and all(isinstance(b, list) and len(b) == 4 for b in entry)
        ):
            raise VisionLoraError(f"{path}: boxes for {file.name} must be a list of [x0, y0, x1, y1]")
        boxes.append(entry)
    return boxes


def _cmd_compare(args) -> int:
    from visionlora.artifacts import new_run_dir
    from visionlora.compare import compare_runs, train_both

    yaml_values, flags = _given_settings(args)
    settings = {**yaml_values, **flags}
    if len(args.runs) == 2:
        output = Path(settings.get("output") or Path(args.runs[0]).parent / "comparison")
        comparison = compare_runs(args.runs[0], args.runs[1], output)
    elif not args.runs:
        if not settings.get("data"):
            raise VisionLoraError("compare needs two run folders, or --data to train LoRA and full on")
        task = settings.get("task", "classification")
        output = new_run_dir("compare", task, settings.get("output"), bool(settings.get("overwrite")))
        config_from_args(args)  # check the settings before training anything
        comparison = train_both({k: v for k, v in settings.items() if k != "overwrite"}, output)
    else:
        raise VisionLoraError(f"compare takes two run folders (or none, with --data), not {len(args.runs)}")
    from visionlora.compare import comparison_markdown

    print(comparison_markdown(comparison))
    print(f"wrote {output}/comparison.md, comparison.json, comparison.png")
    return 0


def _cmd_demo(args) -> int:
    from visionlora.demo import run_demo

    run_demo(Path(args.output))
    return 0


def _emit(data: Any, output: str | None) -> None:
    text = json.dumps(data, indent=2)
    if output:
        from visionlora.artifacts import atomic_write_bytes

        try:
            atomic_write_bytes(Path(output), (text + "\n").encode())
        except OSError as err:
            raise VisionLoraError(f"{output}: cannot write: {err.strerror or err}") from None
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)
