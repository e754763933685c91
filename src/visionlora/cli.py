"""The ``visionlora`` command: subcommands -> config -> engine, inference or demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from visionlora import __version__
from visionlora.deploy import MAX_METRIC_DROP
from visionlora.errors import VisionLoraError
from visionlora.serving import DEFAULT_MAX_LOADED

COMMANDS = {
    "train": "train a LoRA adapter or a full model",
    "evaluate": "evaluate a finished run",
    "predict": "predict images with a finished run",
    "compare": "LoRA vs full: train both on --data, or compare two finished runs",
    "serve": "serve finished runs over HTTP, LoRA adapters sharing one base",
    "export": "export runs: a merged transformers checkpoint, an ONNX model (int8 too), or adapters over an ONNX base",
    "demo": "train LoRA and full on a generated image set (offline, minutes on a CPU)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(named if named in COMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        from visionlora.console import quiet_libraries

        quiet_libraries()
        return args.handler(args) or 0
    except VisionLoraError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`)
        sys.stderr.close()
        return 0
    except Exception as err:  # a bug or an unforeseen input: still one line, traceback with --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
              " (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; with ``only``, just that command's arguments are built
    (``""``: none), so that ``visionlora --help`` imports nothing heavy."""
    parser = argparse.ArgumentParser(
        prog="visionlora",
        description="Fine-tune vision transformers with LoRA (or fully) on your own labelled images.",
    )
    parser.add_argument("--version", action="version", version=f"visionlora {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    builders = {"train": _train_parser, "evaluate": _evaluate_parser, "predict": _predict_parser,
                "compare": _compare_parser, "serve": _serve_parser, "export": _export_parser,
                "demo": _demo_parser}
    for name, help_text in COMMANDS.items():
        if only is None or only == name:
            builders[name](commands, common, help_text)
        else:
            commands.add_parser(name, help=help_text)
    return parser


def _train_parser(commands, common, help_text: str) -> None:
    train = commands.add_parser("train", parents=[common], help=help_text, description=_train_description())
    train.add_argument("--config", metavar="FILE", help="YAML file of settings (flags given here win)")
    train.add_argument(
        "--resume", nargs="?", const=True, metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (RUN_DIR, or the --output folder)",
    )
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train)


def _loading_flags() -> argparse.ArgumentParser:
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (they can run code)")
    loading.add_argument("--trust-remote-code", action="store_true", help="allow the base model to run its own code")
    loading.add_argument("--allow-base-change", action="store_true",
                         help="load an adapter even if its base model changed since it was trained")
    return loading


def _threads_flag() -> argparse.ArgumentParser:
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads of each forward, torch's and onnxruntime's (default: one per core)")
    return threads


def _use_threads(args) -> None:
    """Apply --threads (read by onnxruntime sessions as they are made, and by torch)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise VisionLoraError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _evaluate_parser(commands, common, help_text: str) -> None:
    evaluate = commands.add_parser("evaluate", parents=[common, _loading_flags()], help=help_text)
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="the run folder (holding trained_model_lora/ or trained_model/)")
    evaluate.add_argument("--data", help="labelled data to evaluate on (default: the run's validation split)")
    evaluate.add_argument("--split", choices=("val", "test"), default="val",
                          help="without --data: the run's validation (default) or held-out test part")
    evaluate.add_argument("--output", metavar="FILE.json", help="also write the metrics here")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _predict_parser(commands, common, help_text: str) -> None:
    """Generic arguments, then each task's options and writers (a flag shared by tasks is added once)."""
    from visionlora.tasks import get_task, task_names

    predict = commands.add_parser("predict", parents=[common, _loading_flags(), _threads_flag()], help=help_text)
    predict.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER_OR_VIDEO",
                         help="image files, folders of images, or videos (mp4, avi, mov, mkv)")
    videos = predict.add_argument_group("videos")
    videos.add_argument("--every", type=int, default=1, metavar="N", help="predict every N-th frame (default 1)")
    videos.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="first time to predict")
    videos.add_argument("--end", type=float, default=None, metavar="SECONDS", help="last time to predict")
    videos.add_argument("--save-video", metavar="OUT.mp4", help="write the video with the predictions drawn "
                        "(H.264, at the source frame rate divided by --every)")
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
        for item in task.writers:
            add_once(predict, item, item.help)
        for item in task.predict_options:
            add_once(predict, item, f"{name}: {item.help}")
        if task.box_options:
            group = predict.add_argument_group(f"{name} in the boxes another model finds (top-down)")
            for item in task.box_options:
                add_once(group, item, item.help)
    predict.set_defaults(handler=_cmd_predict)


def _compare_parser(commands, common, help_text: str) -> None:
    compare = commands.add_parser(
        "compare", parents=[common], help=help_text,
        description="visionlora compare --task T --data PATH [training flags]   trains both modes alike; "
        "visionlora compare RUN_A RUN_B   compares two finished runs. Writes comparison.md/.json/.png.",
    )
    compare.add_argument("runs", nargs="*", metavar="RUN", help="two finished run folders (or none, with --data)")
    compare.add_argument("--config", metavar="FILE", help="YAML file of training settings (flags given here win)")
    _add_config_flags(compare)
    compare.set_defaults(handler=_cmd_compare)


def _serve_parser(commands, common, help_text: str) -> None:
    serve = commands.add_parser("serve", parents=[common, _threads_flag()], help=help_text,
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
    serve.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="inference precision (fp32 answers equal visionlora predict)")
    serve.set_defaults(handler=_cmd_serve)


def _export_parser(commands, common, help_text: str) -> None:
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
    export.set_defaults(handler=_cmd_export)


def _demo_parser(commands, common, help_text: str) -> None:
    demo = commands.add_parser("demo", parents=[common], help=help_text)
    demo.add_argument("--output", default="runs/demo", metavar="DIR", help="where the demo data and runs go")
    demo.set_defaults(handler=_cmd_demo)


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

    yaml_values, flags = _given_settings(args)
    return build_config(yaml_values, flags)


def _cmd_train(args) -> int:
    from visionlora.config import coerce
    from visionlora.training.engine import resume, train

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
        test = result.summary.get("test_metrics")
        held_out = f", test {test[main]:.4f}" if test else ""
        print(f"best epoch {result.summary['best_epoch']}: {main} {metrics[main]:.4f}{held_out} -> {result.paths.root}")
    return 0


def _cmd_evaluate(args) -> int:
    from visionlora.deploy.predictor import load_run

    run = load_run(args.run_dir, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                   allow_base_change=args.allow_base_change)
    result = run.evaluate(args.data, split=args.split)
    _emit(result, args.output)
    return 0


def _cmd_predict(args) -> int:
    from visionlora.deploy.predictor import box_finder, image_files, load_run
    from visionlora.deploy.video import is_video

    if args.engine == "ray":
        return _predict_on_ray(args)
    _use_threads(args)
    if args.runs:
        raise VisionLoraError("--runs takes effect with --engine ray")
    loading = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    run = load_run(args.run_dir, allow_base_change=args.allow_base_change, **loading)
    options, box_values, outputs = _task_arguments(args, run.task, run.paths.root)
    finder = box_finder(run, box_values, **loading)
    videos = [item for item in args.images if is_video(item)]
    if videos:
        return _predict_videos(args, run, videos, options, outputs, finder)
    if args.save_video:
        raise VisionLoraError("--save-video needs a video to predict on")
    files = list(image_files(args.images))
    if not files:
        raise VisionLoraError(f"no image files found in: {' '.join(args.images)}")
    predictions, skipped = run.predict_files(files, outputs=outputs, box_finder=finder, **options)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): "
              + "; ".join(f"{s['file']} ({s['reason']})" for s in skipped), file=sys.stderr)
    if "output" in outputs:
        print(f"wrote {outputs['output']}", file=sys.stderr)
    else:
        print(json.dumps(predictions, indent=2))
    return 0


def _predict_on_ray(args) -> int:
    from visionlora.deploy.runs import open_run

    try:
        import ray

        from visionlora.ray_cluster import join_cluster
        from visionlora.serving.ray_batch import DECODE_CPUS, ActorPool, plan_job, run_job
    except ImportError as err:
        raise VisionLoraError(f"--engine ray needs Ray Data ({err.name} is missing): "
                              "pip install 'visionlora[ray]'") from None
    if min(args.actors, args.batch_size) < 1 or args.cpus_per_actor <= 0:
        raise VisionLoraError("--actors and --batch-size must be at least 1, --cpus-per-actor above 0")
    runs = [args.run_dir, *args.runs]
    tasks = {task.name: task for task in (open_run(run).task for run in runs)}
    if len(tasks) != 1:
        raise VisionLoraError(f"--runs: the runs are of different tasks ({', '.join(sorted(tasks))})")
    task = next(iter(tasks.values()))
    options, box_values, outputs = _task_arguments(args, task, Path(args.run_dir))
    if any(value is not None for value in box_values.values()) or set(outputs) - {"output"}:
        raise VisionLoraError("--engine ray writes --output FILE.jsonl or .parquet only (no boxes from a "
                              "detector, no drawn images or tables)")
    if "output" not in outputs:
        raise VisionLoraError("--engine ray needs --output FILE.jsonl or FILE.parquet")
    job = plan_job(runs, args.images, outputs["output"], options)
    pool = ActorPool(args.actors, args.cpus_per_actor, args.gpus_per_actor or 0.0, args.batch_size, args.decode)
    join_cluster(args.ray_address, pool.actors * pool.cpus + DECODE_CPUS)
    if args.gpus_per_actor is None and ray.cluster_resources().get("GPU", 0) > 0:
        pool.gpus = 1.0  # the cluster's GPUs, not this machine's: the actors may run elsewhere
    try:
        counts = run_job(job, pool)
    finally:
        ray.shutdown()
    print(f"wrote {counts['written']} rows to {job.output} ({counts['already_done']} already there, "
          f"{counts['errors']} unreadable images as rows with an error)", file=sys.stderr)
    return 0


def _predict_videos(args, run, videos: list[str], options: dict[str, Any], outputs: dict[str, Path], finder) -> int:
    """Predict each video's frames; JSON and DeepLabCut tables cover one video at a time."""
    from visionlora.artifacts import atomic_write_json
    from visionlora.deploy.video import predict_video
    if len(videos) != len(args.images):
        raise VisionLoraError("predict either images or videos in one call, not both")
    if len(videos) > 1 and (args.save_video or set(outputs) - {"output"}):
        raise VisionLoraError("--save-video, --csv and --h5 take one video at a time")
    if "save_images" in outputs:
        raise VisionLoraError("--save-images is for images; for a video, use --save-video OUT.mp4")
    predict = run.predictor(options, finder)
    results = []
    for video in videos:
        results.append(predict_video(video, predict, run.draw, args.every, args.start, args.end,
                                     Path(args.save_video) if args.save_video else None, progress=True))
        if args.save_video:
            drawn = results[-1]["drawn_video"]
            print(f"wrote {drawn['path']} ({drawn['codec']}, {drawn['fps']:g} fps)", file=sys.stderr)
    for writer in run.task.writers:
        if writer.name in outputs and writer.name != "output":
            writer.write(outputs[writer.name], results[0]["frames"], [], run.draw)
            print(f"wrote {outputs[writer.name]}", file=sys.stderr)
    answer = results[0] if len(results) == 1 else results
    if "output" in outputs:
        atomic_write_json(outputs["output"], answer)
        print(f"wrote {outputs['output']}", file=sys.stderr)
    else:
        print(json.dumps(answer, indent=2))
    return 0


def _task_arguments(args, task, run_root: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """The run's task options (parsed by the task), its box options' values and the writer
    targets given on the command line.

    An option or writer that another task declares is a clear error for this run.
    """
    from visionlora.tasks import get_task, task_names

    def declared(t):
        return (*t.writers, *t.predict_options, *t.box_options)

    own = {item.name for item in declared(task)}
    for name in task_names():
        for item in declared(get_task(name)):
            if item.name not in own and getattr(args, item.name, None) is not None:
                raise VisionLoraError(f"{item.flag} is a {name} option; {run_root} is a {task.name} run")

    def given(items):
        return {o.name: o.parse(getattr(args, o.name)) for o in items if getattr(args, o.name) is not None}

    outputs = {w.name: Path(getattr(args, w.name)) for w in task.writers if getattr(args, w.name) is not None}
    return given(task.predict_options), given(task.box_options), outputs


def _cmd_compare(args) -> int:
    from visionlora.artifacts import new_run_dir
    from visionlora.reporting.compare import compare_runs, train_both
    from visionlora.tasks import DEFAULT_TASK

    yaml_values, flags = _given_settings(args)
    settings = {**yaml_values, **flags}
    if len(args.runs) == 2:
        output = Path(settings.get("output") or Path(args.runs[0]).parent / "comparison")
        comparison = compare_runs(args.runs[0], args.runs[1], output)
    elif not args.runs:
        if not settings.get("data"):
            raise VisionLoraError("compare needs two run folders, or --data to train LoRA and full on")
        task = settings.get("task", DEFAULT_TASK)
        output = new_run_dir("compare", task, settings.get("output"), bool(settings.get("overwrite")))
        config_from_args(args)  # check the settings before training anything
        comparison = train_both({k: v for k, v in settings.items() if k != "overwrite"}, output)
    else:
        raise VisionLoraError(f"compare takes two run folders (or none, with --data), not {len(args.runs)}")
    from visionlora.reporting.compare import comparison_markdown

    print(comparison_markdown(comparison))
    print(f"wrote {output}/comparison.md, comparison.json, comparison.png")
    return 0


def _cmd_serve(args) -> int:
    import uvicorn

    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore

    if not args.runs and not args.runs_dir:
        raise VisionLoraError("serve needs run folders, --runs-dir DIR, or both")
    _use_threads(args)
    settings = ServeSettings(args.max_batch_size, args.max_wait_ms, args.max_upload_mb, args.admin_token,
                             args.precision, args.mixed_batches)
    if args.ray:
        return _serve_on_ray(args, settings)
    store = ModelStore(runs_dir=args.runs_dir, max_loaded=args.max_loaded_adapters)
    for item in args.runs:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        store.add(name or Path(path).resolve().name, path)
    for served in store.models.values():
        others = served.describe()["shares_base_with"]
        shared = f", sharing its base with {', '.join(others)}" if others else ""
        print(f"serving {served.name}: {served.task.name} {served.info.mode} run {served.paths.root}{shared}",
              flush=True)
    if store.runs_dir:
        print(f"serving the {len(store.available())} finished runs in {store.runs_dir} (and any added later) on "
              f"demand, at most {store.max_loaded} loaded", flush=True)
    print(f"listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(store, settings), host=args.host, port=args.port, log_level="warning")
    return 0


def _serve_on_ray(args, settings) -> int:
    from dataclasses import asdict

    try:
        from visionlora.serving.ray import RaySettings, run_on_ray
    except ImportError as err:
        raise VisionLoraError(f"--ray needs Ray Serve ({err.name} is missing): pip install 'visionlora[ray]'") from None
    if args.runs or not args.runs_dir:
        raise VisionLoraError("--ray serves --runs-dir DIR (on storage every node sees), not run folders named "
                              "one by one")
    if not Path(args.runs_dir).is_dir():
        raise VisionLoraError(f"{args.runs_dir}: no such folder of runs")
    if args.admin_token:
        raise VisionLoraError("--admin-token is not taken with --ray: add runs to --runs-dir instead")
    autoscaling = _autoscaling_config(args.autoscaling) if args.autoscaling else None
    if min(args.replicas, args.max_loaded_adapters, args.max_ongoing_requests or 1) < 1:
        raise VisionLoraError("--replicas, --max-loaded-adapters and --max-ongoing-requests must be at least 1")
    ray_settings = RaySettings(str(Path(args.runs_dir).resolve()), args.max_loaded_adapters, args.replicas,
                               args.replica_cpus, args.replica_gpus, args.max_ongoing_requests, autoscaling,
                               asdict(settings))
    run_on_ray(ray_settings, args.host, args.port, args.ray_address)
    return 0


def _autoscaling_config(text: str) -> dict[str, Any]:
    """``--autoscaling`` checked by Ray Serve's own AutoscalingConfig, so a typo is one line here."""
    from ray.serve.config import AutoscalingConfig

    try:
        config = json.loads(text)
    except ValueError as err:
        raise VisionLoraError(f"--autoscaling: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise VisionLoraError("--autoscaling: a JSON object of Ray Serve's autoscaling_config fields")
    unknown = set(config) - set(AutoscalingConfig.model_fields)
    if unknown:
        raise VisionLoraError(f"--autoscaling: {', '.join(sorted(unknown))} is not a field of Ray Serve's "
                              f"autoscaling_config ({', '.join(sorted(AutoscalingConfig.model_fields))})")
    try:
        AutoscalingConfig(**config)
    except ValueError as err:  # pydantic's ValidationError
        message = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise VisionLoraError(f"--autoscaling: {message}") from None
    return config


def _cmd_export(args) -> int:
    from visionlora.deploy.export import export_run

    if args.format == "onnx-adapters":
        return _export_adapters(args)
    if len(args.run_dirs) > 1:
        raise VisionLoraError(f"--format {args.format} exports one run; several runs go to --format onnx-adapters")
    args.run_dir = args.run_dirs[0]
    record = export_run(args.run_dir, args.output, args.format, args.overwrite, quantize=args.quantize,
                        max_metric_drop=args.max_metric_drop)
    checks = f"merged vs adapter max |diff| {record['merged_max_abs_diff']:.2e}"
    if record["format"] == "onnx":
        checks += f"; onnxruntime vs torch max |diff| {record['onnx_max_abs_diff']:.2e}, opset {record['opset']}"
    print(f"exported {args.run_dir} as {record['format']} to {args.output} "
          f"({checks}, {record['checked_images']} images)")
    if "quantization" in record:
        q = record["quantization"]
        print(f"int8: validation {q['main_metric']} {q['int8']:.4f} (fp32 {q['fp32']:.4f}, limit "
              f"{q['max_metric_drop']:g}); outputs max |diff| {q['max_abs_diff']:.3g}, top-1 agreement "
              f"{q['top1_agreement']:.1%}; {q['int8_bytes'] / 1e6:.1f} MB (fp32 {q['fp32_bytes'] / 1e6:.1f} MB)")
    return 0


def _export_adapters(args) -> int:
    from visionlora.deploy.onnx_adapters import export_adapters

    if args.quantize:
        raise VisionLoraError("--quantize int8 applies to --format onnx, not to onnx-adapters")
    record = export_adapters(args.run_dirs, args.output, args.overwrite)
    for label, run in record["runs"].items():
        if run["format"] == "onnx-adapter":
            print(f"{label}: adapter {run['adapter_bytes'] / 1e6:.2f} MB over {run['base']}, logits max |diff| "
                  f"{run['onnx_max_abs_diff']:.2e} against peft")
    sizes = ", ".join(f"{base['folder']} {base['bytes'] / 1e6:.1f} MB" for base in record["bases"])
    print(f"exported {len(record['runs'])} runs to {args.output} "
          f"({len(record['bases'])} ONNX bases: {sizes or 'none'})")
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
