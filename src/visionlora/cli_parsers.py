"""The arguments of each ``visionlora`` command, and the training settings they give.

Each builder adds one command's parser to the subcommands and returns it; ``visionlora.cli``
sets the function each command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

from visionlora.deploy import MAX_METRIC_DROP
from visionlora.deploy.tracking import MATCH_THRESH, METHODS, TRACK_BUFFER, TRACK_THRESH
from visionlora.serving import DEFAULT_MAX_LOADED, DEFAULT_MAX_PIXELS
from visionlora.training import DEFAULT_PACK_ROWS

if TYPE_CHECKING:
    from visionlora.config import TrainConfig

Parser = argparse.ArgumentParser
Subcommands = argparse._SubParsersAction


def train_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    train = commands.add_parser("train", parents=[common], help=help_text, description=_train_description())
    train.add_argument("--config", metavar="FILE", help="YAML file of settings (flags given here win)")
    train.add_argument(
        "--resume", nargs="?", const=True, metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (RUN_DIR, or the --output folder)",
    )
    add_config_flags(train)
    return train


def train_many_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    many = commands.add_parser(
        "train-many", parents=[common], help=help_text,
        description="Train one adapter per job in one process, packed over one shared base where jobs share its "
                    "base, task, input size and label count. Every training flag applies to every job unless the "
                    "job sets it; --output DIR gets one run folder per job, a jobs.csv and the final table.")
    jobs = many.add_mutually_exclusive_group()
    jobs.add_argument("--data-each", metavar="DIR", help="one job per subfolder of DIR, named after it (any data "
                      "format train reads)")
    jobs.add_argument("--jobs", metavar="FILE", help="YAML list of jobs, each with a name, its data and any "
                      "training setting")
    many.add_argument("--config", metavar="FILE", help="YAML file of settings shared by every job (flags win)")
    add_many_flags(many, "jobs")
    many.add_argument("--resume", action="store_true", help="continue the train-many in --output: finished jobs "
                      "are kept, the others continue from their last checkpoint")
    add_config_flags(many)
    return many


def tune_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    tune = commands.add_parser(
        "tune", parents=[common], help=help_text,
        description="Search LoRA settings (rank, alpha, learning rate, target modules, dropout, method) on --data "
                    "by successive halving: every trial trains a few epochs, the best 1/eta go on for eta times as "
                    "many, up to --epochs; each rung's trials train packed. --output DIR gets leaderboard.csv, "
                    "tune.png and the best settings' run at DIR/best.")
    tune.add_argument("--trials", type=int, default=16, metavar="N", help="settings tried (default 16; the "
                      "first is the task's preset)")
    tune.add_argument("--eta", type=int, default=3, metavar="N", help="keep the best 1/N of the trials at "
                      "each rung, and train them N times longer (default 3)")
    tune.add_argument("--space", metavar="FILE", help="YAML of the searched settings to narrow or widen: "
                      "lora_r, alpha_ratio, lr, target_modules, lora_dropout, method (lists of choices, or "
                      "{low, high} for a log-uniform range)")
    tune.add_argument("--config", metavar="FILE", help="YAML file of the settings every trial shares")
    add_many_flags(tune, "trials of each rung")
    tune.add_argument("--resume", action="store_true", help="continue the tune in --output")
    add_config_flags(tune)
    return tune


def pack_rows_value(text: str) -> int | None:
    """``--pack-rows``: a count of rows of at least 1, or auto (None)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number of at least 1, got {text!r}")
    return int(text)


def add_many_flags(parser: Parser, what: str) -> None:
    """The flags of the commands that train many jobs at once: how many rows a packed step holds, and the
    Ray cluster that ``what`` spread over."""
    parser.add_argument("--pack-rows", type=pack_rows_value, default=None, metavar="N|auto",
                        help="rows (images) of one packed forward and backward at most; more jobs' batches step "
                        f"in several (default auto: up to {DEFAULT_PACK_ROWS} on a GPU, one job's batch per step on "
                        "a CPU, whose cores one batch keeps busy; lower it when memory runs short)")
    parser.add_argument("--ray-address", metavar="ADDRESS", help=f"spread the {what} over the Ray cluster at "
                        "ADDRESS (local: start one here) through Ray Tune, each worker packing its share; "
                        "--output must be storage every node sees")
    parser.add_argument("--ray-workers", type=int, metavar="N", help=f"with --ray-address: how many workers "
                        f"share the {what} (default: one per GPU of the cluster, else one per CPU)")


def loading_flags() -> Parser:
    """The flags that allow what loading a run refuses by default."""
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (they can run code)")
    loading.add_argument("--trust-remote-code", action="store_true", help="allow the base model to run its own code")
    loading.add_argument("--allow-base-change", action="store_true",
                         help="load an adapter even if its base model changed since it was trained")
    return loading


def threads_flag() -> Parser:
    """``--threads``, applied by the commands that predict."""
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads of each forward, torch's and onnxruntime's (default: one per core)")
    return threads


def precision_flag() -> Parser:
    """``--precision``, the precision the commands that predict run torch models in."""
    precision = argparse.ArgumentParser(add_help=False)
    precision.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                           help="precision of torch models: auto (default: bf16 weights where the device runs bf16 "
                                "natively and the run's outputs in bf16 stay close to fp32's on a few of its "
                                "images, else fp32), fp32 (answers equal the Python API's) or bf16; an ONNX "
                                "export runs in the precision it was exported in")
    return precision


def device_flag() -> Parser:
    """``--device``, where the commands that load runs put them."""
    from visionlora.runtime import DEVICES

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", metavar=DEVICES,
                        help="where the model runs (default auto: CUDA, then Apple MPS, then the CPU); an ONNX "
                             "export runs on onnxruntime's CUDA provider on a CUDA device where it has one")
    return device


def evaluate_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    evaluate = commands.add_parser("evaluate", parents=[common, loading_flags(), device_flag(), precision_flag()],
                                   help=help_text)
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="the run folder (holding trained_model_lora/ or trained_model/)")
    evaluate.add_argument("--data", help="labelled data to evaluate on (default: the run's validation split)")
    evaluate.add_argument("--split", choices=("val", "test"), default="val",
                          help="without --data: the run's validation (default) or held-out test part")
    evaluate.add_argument("--output", metavar="FILE.json", help="also write the metrics here")
    return evaluate


def predict_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    """Generic arguments, then each task's options and writers (a flag shared by tasks is added once)."""
    from visionlora.tasks import get_task, task_names

    predict = commands.add_parser("predict", parents=[common, loading_flags(), device_flag(), threads_flag(),
                                                      precision_flag()],
                                  help=help_text)
    predict.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER_OR_VIDEO",
                         help="image files, folders of images, or videos (mp4, avi, mov, mkv)")
    videos = predict.add_argument_group("videos")
    videos.add_argument("--every", type=int, default=1, metavar="N", help="predict every N-th frame (default 1)")
    videos.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="first time to predict")
    videos.add_argument("--end", type=float, default=None, metavar="SECONDS", help="last time to predict")
    videos.add_argument("--save-video", metavar="OUT.mp4", help="write the video with the predictions drawn "
                        "(H.264, at the source frame rate divided by --every)")
    add_tracking_flags(videos)
    add_label_format_flag(predict)
    scale = predict.add_argument_group("many images on a Ray cluster (pip install 'visionlora[ray]')")
    scale.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="ray: Ray Data decodes images in CPU tasks and an actor pool predicts; needs --output "
                            "FILE.jsonl or .parquet, and skips the images a stopped job already wrote")
    scale.add_argument("--runs", nargs="+", default=[], metavar="RUN",
                       help="with --engine ray: more runs predicting every image (a CSV list with a 'run' column "
                            "names each image's run); each row says its run")
    scale.add_argument("--actors", type=int, default=1, help="with --engine ray: predicting actors (default 1)")
    scale.add_argument("--batch-size", type=int, default=64, help="with --engine ray: images per batch (default 64)")
    scale.add_argument("--decode", choices=("auto", "tasks", "actors"), default="auto",
                       help="with --engine ray: where images are decoded; auto: in CPU tasks of their own for "
                            "actors on GPUs, in the actors otherwise")
    scale.add_argument("--cpus-per-actor", type=float, default=1.0,
                       help="with --engine ray: CPUs per actor, which are its torch threads (default 1)")
    scale.add_argument("--gpus-per-actor", type=float, default=None,
                       help="with --engine ray: GPUs per actor (default 1 where the Ray cluster has GPUs, else 0)")
    scale.add_argument("--ray-address", metavar="ADDRESS",
                       help="with --engine ray: the cluster (e.g. auto, or HOST:6379); default: a local one")
    seen: set[str] = set()

    def add_once(group, item, help_text: str) -> None:
        if item.flag not in seen:
            seen.add(item.flag)
            group.add_argument(item.flag, dest=item.name, metavar=item.metavar, default=None, help=help_text)

    for name in task_names():
        task = get_task(name)
        for writer in task.writers:
            add_once(predict, writer, writer.help)
        for option in task.predict_options:
            add_once(predict, option, f"{name}: {option.help}")
        if task.box_options:
            group = predict.add_argument_group(f"{name} in the boxes another model finds (top-down)")
            for option in task.box_options:
                add_once(group, option, option.help)
    return predict


def add_label_format_flag(predict: Parser) -> None:
    """``--format``: pre-labels for a labelling tool, written to ``--output``."""
    from visionlora.tasks import get_task, task_names

    per_task = [f"{name}: {'|'.join(f.name for f in get_task(name).label_formats)}"
                for name in task_names() if get_task(name).label_formats]
    predict.add_argument("--format", metavar="FORMAT", default=None,
                         help="write --output as pre-labels a labelling tool imports, rather than JSON ("
                              + "; ".join(per_task) + "); dataset formats (coco, yolo, voc, deeplabcut) write a "
                              "new folder with the images copied, labelstudio a tasks JSON and its labelling "
                              "config (.xml beside it), cvat a CVAT for images 1.1 XML file")


def add_tracking_flags(videos: argparse._ArgumentGroup) -> None:
    """``--track`` and its settings, for videos."""
    videos.add_argument("--track", nargs="?", const=METHODS[0], choices=METHODS, default=None,
                        help="follow boxes (detection) or instances (pose with --detector) through the video: a "
                             "track_id per box in the JSON, IDs and trails in --save-video, individuals named by "
                             "track in --csv/--h5 (default tracker: bytetrack; pip install 'visionlora[track]')")
    videos.add_argument("--track-buffer", type=int, default=TRACK_BUFFER, metavar="FRAMES",
                        help=f"with --track: frames a lost track is kept to be found again (default {TRACK_BUFFER})")
    videos.add_argument("--track-thresh", type=float, default=TRACK_THRESH, metavar="SCORE",
                        help="with --track: boxes scoring at least this are matched first and start new tracks; "
                             f"lower ones only continue tracks (default {TRACK_THRESH})")
    videos.add_argument("--match-thresh", type=float, default=MATCH_THRESH, metavar="IOU",
                        help="with --track: the least overlap (IoU) of a track's predicted box and a box for them "
                             f"to match (default {MATCH_THRESH})")
    videos.add_argument("--max-individuals", type=int, default=None, metavar="N",
                        help="with --track: at most N identities (a known number of animals); a new track takes a "
                             "lost identity rather than a new one")
    videos.add_argument("--mot", metavar="FILE.txt",
                        help="with --track: write the tracks as MOT Challenge text (frame,id,x,y,w,h,score,-1,-1,-1)")


def compare_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    compare = commands.add_parser(
        "compare", parents=[common], help=help_text,
        description="visionlora compare --task T --data PATH [training flags]   trains both modes alike; "
        "visionlora compare RUN_A RUN_B   compares two finished runs. Writes comparison.md/.json/.png.",
    )
    compare.add_argument("runs", nargs="*", metavar="RUN", help="two finished run folders (or none, with --data)")
    compare.add_argument("--config", metavar="FILE", help="YAML file of training settings (flags given here win)")
    add_config_flags(compare)
    return compare


def serve_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    serve = commands.add_parser("serve", parents=[common, device_flag(), threads_flag(), precision_flag()],
                                help=help_text,
                                description="Serve runs over HTTP: GET / for a page to try them, "
                                            "/v1/models for the API.")
    serve.add_argument("runs", nargs="*", metavar="[NAME=]RUN",
                       help="run folders, loaded at start and kept; a model's name is its folder's name or NAME")
    serve.add_argument("--runs-dir", metavar="DIR",
                       help="also serve every finished run in DIR by its folder name, each loaded on its first "
                            "request (runs added later included)")
    serve.add_argument("--max-loaded-adapters", type=int, default=DEFAULT_MAX_LOADED, metavar="N",
                       help="runs held at once; the least recently used run from --runs-dir is unloaded to load "
                            f"another (default {DEFAULT_MAX_LOADED})")
    serve.add_argument("--ray", action="store_true",
                       help="serve --runs-dir on Ray Serve: replicas, each model routed to one holding it "
                            "(pip install 'visionlora[ray]')")
    serve.add_argument("--ray-address", metavar="ADDRESS",
                       help="the Ray cluster to deploy on (e.g. auto, or HOST:6379); default: a local one")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (default 1)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs per replica (default 1)")
    serve.add_argument("--replica-gpus", type=float, default=0.0, help="with --ray: GPUs per replica (default 0)")
    serve.add_argument("--max-ongoing-requests", type=int, metavar="N",
                       help="with --ray: requests a replica takes at once, the rest wait in Ray's router "
                            "(default 4 x --max-batch-size)")
    serve.add_argument("--autoscaling", metavar="JSON",
                       help="with --ray: Ray Serve's autoscaling_config, e.g. "
                            "'{\"min_replicas\": 1, \"max_replicas\": 4}' (instead of --replicas)")
    serve.add_argument("--no-mixed-batches", dest="mixed_batches", action="store_false",
                       help="batch each adapter's requests apart (by default requests for different LoRA "
                            "adapters of one base share forwards)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch-size", type=int, default=16, help="images per batched forward (default 16)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a request waits for others to batch with")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    serve.add_argument("--admin-token", help="enable POST/DELETE /v1/models, with 'Authorization: Bearer TOKEN'")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every route but liveness (default: the "
                            "VISIONLORA_API_KEY environment variable, which keeps the key out of ps)")
    serve.add_argument("--public-metrics", action="store_true", help="with a key: leave /metrics open")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="listen on an address other than loopback without an API key")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help="refuse an image whose header claims more pixels, before decoding it "
                            f"(default {DEFAULT_MAX_PIXELS:,})")
    serve.add_argument("--max-queue", type=int, metavar="N",
                       help="prediction requests held at once; more are answered 503 with Retry-After at once "
                            "(default: no bound)")
    serve.add_argument("--timeout-s", type=float, metavar="SECONDS",
                       help="answer 504 to a prediction request not answered within SECONDS, dropping its "
                            "images if their forward has not started (default: no deadline)")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile each served torch model at load, warmed up before it serves (the "
                            "warm-up is printed and shown in /v1/models; off by default: see docs/serving.md)")
    return serve


def export_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    export = commands.add_parser(
        "export", parents=[common], help=help_text,
        description="merged: the adapter merged into its base, a folder plain transformers loads; "
        "onnx: that model as model.onnx, checked in onnxruntime against torch on the run's validation images; "
        "onnx-adapters: several LoRA runs as one ONNX base per shared base model and an onnxruntime adapter "
        "file per run.")
    export.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a finished run folder (several with --format onnx-adapters)")
    export.add_argument("--output", required=True, metavar="DIR", help="the export folder")
    export.add_argument("--format", default="merged", metavar="merged|onnx|onnx-adapters",
                        help="merged (default), onnx or onnx-adapters")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument("--quantize", choices=("int8",),
                        help="with --format onnx: int8 weights (onnxruntime's dynamic quantization), evaluated on "
                             "the run's validation split beside fp32")
    export.add_argument("--max-metric-drop", type=float, default=MAX_METRIC_DROP, metavar="X",
                        help="with --quantize: refuse when the main metric falls by more than X, in its own units "
                             f"(default {MAX_METRIC_DROP}; pose's pixel error rises)")
    return export


def check_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    check = commands.add_parser(
        "check", parents=[common], help=help_text,
        description="Check DATA as --task reads it for training (any format and layout train takes): unreadable "
                    "files, identical and near-duplicate images within and across parts (leaks), class balance, "
                    "sizes against the model's input, EXIF rotation, annotations left out, and the task's own "
                    "label sanity. One line per problem; check.json and check.html in --output. Exit 0 when no "
                    "error is found (--strict: no warning either), else 1.")
    check.add_argument("data", metavar="DATA", help="the dataset folder (or file), as --data of train")
    check.add_argument("--task", default=None, help="the task whose formats read DATA (default classification)")
    check.add_argument("--val-data", metavar="PATH", help="separate validation data, as train takes it")
    check.add_argument("--model", help="the model whose input size images are checked against (default: the "
                       "task's preset); with --label-errors, the model each fold trains")
    check.add_argument("--image-size", type=int, metavar="N", help="the model input size to check against")
    check.add_argument("--output", metavar="DIR", help="where check.json and check.html go (default "
                       "runs/check/<DATA's name>)")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    errors = check.add_argument_group("label errors (pip install 'visionlora[data]')")
    errors.add_argument("--label-errors", action="store_true", help="also rank likely label errors: train --folds "
                        "quick LoRA runs (train-many, one fold held out each), predict each held-out fold and "
                        "score every label against its out-of-sample prediction")
    errors.add_argument("--folds", type=int, metavar="K", help="folds for --label-errors (default 5, fewer for "
                        "tiny sets: at least 4 images a fold)")
    errors.add_argument("--epochs", type=int, default=5, metavar="N", help="epochs of each fold's run (default 5)")
    errors.add_argument("--config", metavar="FILE", help="YAML of training settings the folds share (flags win)")
    errors.add_argument("--seed", type=int, default=42, help="seed of the folds and their runs (default 42)")
    return check


def demo_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    demo = commands.add_parser("demo", parents=[common], help=help_text)
    demo.add_argument("--output", default="runs/demo", metavar="DIR", help="where the demo data and runs go")
    return demo


def _train_description() -> str:
    from visionlora.tasks import task_names

    return (
        "Train on --data and write runs/<task>/<name>/ (or --output). "
        f"Tasks: {', '.join(task_names())}. Every flag can also be set in the --config YAML file."
    )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
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


def given_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(YAML values, flag values): only the settings the user actually gave."""
    from visionlora.config import config_fields, load_yaml

    names = {f.name for f in config_fields()}
    flags = {k: v for k, v in vars(args).items() if k in names}
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return yaml_values, flags


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge preset < YAML < flags into a TrainConfig."""
    from visionlora.config import build_config

    yaml_values, flags = given_settings(args)
    return build_config(yaml_values, flags)


def select_parser(commands: Subcommands, common: Parser, help_text: str) -> Parser:
    select = commands.add_parser("select", parents=[common, loading_flags(), device_flag(), threads_flag()],
                                 help=help_text, description=help_text + ". Ranks the images by the run's "
                                 "uncertainty (a class margin, box or keypoint scores), then picks by k-center "
                                 "greedy over the run's own image features, weighted by that uncertainty.")
    select.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (trained on the labels so far)")
    select.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="the unlabelled images or folders")
    select.add_argument("--count", type=int, required=True, metavar="K", help="how many images to pick")
    select.add_argument("--output", required=True, metavar="LIST.txt", help="write the picked paths here, one a line")
    select.add_argument("--sheet", metavar="SHEET.png",
                        help="the contact sheet of the picks with their uncertainty (default: LIST.png)")
    return select


BUILDERS: dict[str, Callable[[Subcommands, Parser, str], Parser]] = {
    "train": train_parser, "train-many": train_many_parser, "tune": tune_parser, "evaluate": evaluate_parser,
    "predict": predict_parser, "compare": compare_parser, "serve": serve_parser, "export": export_parser,
    "demo": demo_parser, "check": check_parser, "select": select_parser,
}
