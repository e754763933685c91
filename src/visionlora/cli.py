"""The ``visionlora`` command: subcommands -> config -> engine, inference or demo.

The arguments of each command are built in ``visionlora.cli_parsers``; here each command's
function turns them into a call of the layer that does the work and prints what it answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from visionlora import __version__
from visionlora.cli_parsers import BUILDERS, config_from_args, given_settings
from visionlora.errors import VisionLoraError

COMMANDS = {
    "train": "train a LoRA adapter or a full model",
    "train-many": "train many adapters in one process, packed over one shared base",
    "tune": "search LoRA settings on your data (successive halving, trials trained packed)",
    "evaluate": "evaluate a finished run",
    "predict": "predict images with a finished run",
    "select": "pick the unlabelled images to label next: the model's least sure, spread so none are near-copies",
    "compare": "LoRA vs full: train both on --data, or compare two finished runs",
    "serve": "serve finished runs over HTTP, LoRA adapters sharing one base",
    "export": "export runs: a merged transformers checkpoint, an ONNX model (int8 too), or adapters over an ONNX base",
    "demo": "train LoRA and full on a generated image set (offline, minutes on a CPU)",
    "check": "check a dataset: unreadable files, duplicates and leaks, balance, sizes, labels (--label-errors)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (None: this process's own arguments, the process ending after it)."""
    argv_given, argv = argv, list(sys.argv[1:] if argv is None else argv)
    named = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(named if named in COMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        from visionlora.console import quiet_libraries

        quiet_libraries()
        code = args.handler(args) or 0
        if argv_given is None:
            _skip_final_collection()
        return code
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


def _skip_final_collection() -> None:
    """Spare the ending process the garbage collection of its last moments: Python's shutdown walks
    every object torch and transformers made (about a second on a CPU); the memory goes back
    with the process all the same. Exit handlers still run."""
    import gc

    gc.freeze()


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
    for name, help_text in COMMANDS.items():
        if only is None or only == name:
            BUILDERS[name](commands, common, help_text).set_defaults(handler=HANDLERS[name])
        else:
            commands.add_parser(name, help=help_text)
    return parser


def _use_threads(args) -> None:
    """Apply --threads (read by onnxruntime sessions as they are made, and by torch)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise VisionLoraError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _tell(line: str) -> None:
    """A line about what a command did, beside its answer on stdout."""
    print(line, file=sys.stderr)


def _cmd_train(args) -> int:
    from visionlora.config import coerce
    from visionlora.training.engine import resume, train

    if args.resume:
        yaml_values, flags = given_settings(args)
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


def _cmd_train_many(args) -> int:
    from visionlora.training import many

    yaml_values, flags = given_settings(args)
    output = _output_folder(yaml_values, flags, "train-many needs --output DIR: one run folder per job goes there")
    if args.resume:
        jobs, failed = many.load_plan(output), []
    else:
        jobs, failed = _planned_jobs(args, yaml_values, flags, output)
    outcomes = failed + _job_runner(args)(jobs, output, _tell, args.resume)
    table = many.write_jobs_csv(output, outcomes)
    print(many.outcome_table(outcomes))
    _tell(f"{len(outcomes)} jobs, {sum(o.status == 'failed' for o in outcomes)} failed -> {table}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _output_folder(yaml_values: dict[str, Any], flags: dict[str, Any], missing: str) -> Path:
    """The --output of a command over many jobs, taken out of the settings the jobs share."""
    output = flags.pop("output", None) or yaml_values.pop("output", None)
    if not output:
        raise VisionLoraError(missing)
    return Path(output)


def _job_runner(args):
    """How jobs train: in this process, or spread over the Ray cluster of --ray-address (with absolute paths)."""
    from functools import partial

    from visionlora.training.many import train_many, with_absolute_paths

    if not args.ray_address:
        return partial(train_many, pack_rows=args.pack_rows)

    def on_ray(jobs, output: Path, say, resuming: bool):
        from visionlora.ray_cluster import train_many_on_ray

        address = None if args.ray_address == "local" else args.ray_address
        return train_many_on_ray([with_absolute_paths(job) for job in jobs], output.resolve(), address, say,
                                 resuming, args.ray_workers, args.pack_rows)

    return on_ray


def _planned_jobs(args, yaml_values: dict[str, Any], flags: dict[str, Any], output: Path):
    from visionlora.training import many

    if not (args.data_each or args.jobs):
        raise VisionLoraError("train-many needs its jobs: --data-each DIR (one per subfolder) or --jobs FILE.yaml")
    if args.data_each and "data" in {**yaml_values, **flags}:
        raise VisionLoraError("--data-each gives each job its data: leave --data out")
    if (output / many.PLAN_FILE).is_file() and not flags.get("overwrite"):
        raise VisionLoraError(f"{output} already holds a train-many: --resume continues it, --overwrite starts again")
    specs = many.jobs_from_folders(args.data_each) if args.data_each else many.jobs_from_yaml(args.jobs)
    return many.plan_jobs(specs, yaml_values, flags, output)


def _cmd_tune(args) -> int:
    from visionlora.config import build_config
    from visionlora.training import tune

    yaml_values, flags = given_settings(args)
    output = _output_folder(yaml_values, flags, "tune needs --output DIR: the trials, the leaderboard and the best "
                            "run go there")
    if args.resume:
        state = tune.TuneState.load(output)
    else:
        if args.trials < 2 or args.eta < 2:
            raise VisionLoraError("tune needs --trials and --eta of at least 2")
        if (output / tune.STATE_FILE).is_file() and not flags.get("overwrite"):
            raise VisionLoraError(f"{output} already holds a tune: --resume continues it, --overwrite starts again")
        base = build_config(yaml_values, flags)
        space = tune.default_space(base)
        if args.space:
            space = tune.read_space(args.space, space)
        trials = tune.sample_trials(space, args.trials, tune.preset_settings(base), base.seed)
        state = tune.TuneState(base.to_dict(), tune.rung_epochs(base.epochs, args.trials, args.eta), args.eta, trials)
        output.mkdir(parents=True, exist_ok=True)
        state.save(output)
    comparison = tune.tune(state, output.resolve() if args.ray_address else output, _tell, resuming=args.resume,
                           runner=_job_runner(args))
    print(tune.describe_comparison(comparison))
    _tell(f"leaderboard -> {output / tune.LEADERBOARD}; plot -> {output / tune.PLOT}; best run -> {output / 'best'}")
    return 0


def _cmd_evaluate(args) -> int:
    from visionlora.deploy.predictor import load_run

    run = load_run(args.run_dir, args.device, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                   allow_base_change=args.allow_base_change, precision=args.precision)
    result = run.evaluate(args.data, split=args.split)
    _emit(result, args.output)
    return 0


def _cmd_predict(args) -> int:
    from visionlora.deploy.options import task_arguments
    from visionlora.deploy.predictor import box_finder, load_run
    from visionlora.deploy.video import is_video

    if args.engine == "ray":
        if args.format:
            raise VisionLoraError("--format writes pre-labels with --engine local")
        for flag, value in (("--track", args.track), ("--mot", args.mot), ("--save-video", args.save_video)):
            if value:
                raise VisionLoraError(f"{flag} is for videos, which --engine ray does not predict (it predicts "
                                      "images apart): use --engine local")
        _device_on_ray(args.device, "--engine ray: each actor predicts on the GPU Ray gives it (--gpus-per-actor)")
        return _predict_on_ray(args)
    _use_threads(args)
    if args.runs:
        raise VisionLoraError("--runs takes effect with --engine ray")
    loading = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, device=args.device)
    run = load_run(args.run_dir, allow_base_change=args.allow_base_change, precision=args.precision, **loading)
    options, box_values, outputs = task_arguments(vars(args), run.task, run.paths.root)
    fmt = _label_format(args, run, outputs)
    finder = box_finder(run, box_values, **loading)
    videos = [item for item in args.images if is_video(item)]
    if videos:
        if fmt is not None:
            raise VisionLoraError(f"--format {fmt.name} writes pre-labels for images, not videos")
        code = _predict_videos(args, run, videos, options, outputs, finder)
    else:
        for flag, value in (("--save-video", args.save_video), ("--track", args.track), ("--mot", args.mot)):
            if value:
                raise VisionLoraError(f"{flag} needs a video to predict on")
        code = _predict_images(args, run, options, outputs, finder, fmt)
    _tell(f"precision {run.precision.line()}")  # after the answer: an error stays the one line on stderr
    return code


def _label_format(args, run, outputs: dict[str, Path]):
    """The pre-label format ``--format`` names (checked before predicting), or None."""
    from visionlora.deploy.options import label_format

    if args.format is None:
        return None
    fmt = label_format(run.task, args.format)
    if "output" not in outputs:
        raise VisionLoraError(f"--format {fmt.name} needs --output {fmt.target}")
    return fmt


def _predict_images(args, run, options: dict[str, Any], outputs: dict[str, Path], finder, fmt=None) -> int:
    from visionlora.deploy.predictor import image_files

    files = list(image_files(args.images))
    if not files:
        raise VisionLoraError(f"no image files found in: {' '.join(args.images)}")
    predictions, skipped = run.predict_files(files, outputs=outputs, box_finder=finder, label_format=fmt, **options)
    if skipped:
        _tell(f"skipped {len(skipped)} unreadable file(s): "
              + "; ".join(f"{s['file']} ({s['reason']})" for s in skipped))
    if "output" in outputs:
        _tell(f"wrote {outputs['output']}")
    else:
        print(json.dumps(predictions, indent=2))
    return 0


def _predict_videos(args, run, videos: list[str], options: dict[str, Any], outputs: dict[str, Path], finder) -> int:
    from visionlora.deploy.video import predict_videos

    if len(videos) != len(args.images):
        raise VisionLoraError("predict either images or videos in one call, not both")
    answer = predict_videos(run, videos, options, outputs, finder, args.every, args.start, args.end,
                            Path(args.save_video) if args.save_video else None, tell=_tell,
                            tracking=_track_settings(args), mot=Path(args.mot) if args.mot else None)
    if "output" not in outputs:
        print(json.dumps(answer, indent=2))
    return 0


def _track_settings(args):
    """The tracker settings of ``--track`` and its flags; None without ``--track``."""
    from visionlora.deploy.tracking import TrackSettings

    if args.track is None:
        if args.max_individuals is not None:
            raise VisionLoraError("--max-individuals names tracks: add --track")
        return None
    return TrackSettings(args.track, args.track_buffer, args.track_thresh, args.match_thresh,
                         args.max_individuals).check()


def _predict_on_ray(args) -> int:
    from visionlora.serving.ray_batch import predict_on_ray

    output, counts = predict_on_ray([args.run_dir, *args.runs], args.images, vars(args), args.actors,
                                    args.cpus_per_actor, args.gpus_per_actor, args.batch_size, args.decode,
                                    args.ray_address)
    _tell(f"wrote {counts['written']} rows to {output} ({counts['already_done']} already there, "
          f"{counts['errors']} unreadable images as rows with an error)")
    return 0


def _cmd_compare(args) -> int:
    from visionlora.artifacts import new_run_dir
    from visionlora.reporting.compare import compare_runs, train_both
    from visionlora.tasks import DEFAULT_TASK

    yaml_values, flags = given_settings(args)
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

    from visionlora.serving.app import ServeSettings, VisionServer
    from visionlora.serving.models import ModelStore

    if not args.runs and not args.runs_dir:
        raise VisionLoraError("serve needs run folders, --runs-dir DIR, or both")
    _use_threads(args)
    settings = ServeSettings(args.max_batch_size, args.max_wait_ms, args.max_upload_mb, args.admin_token,
                             args.precision, args.mixed_batches, **_guard_settings(args), compile=args.compile)
    if args.ray:
        _device_on_ray(args.device, "--ray: each replica serves on the GPU Ray gives it (--replica-gpus)")
        return _serve_on_ray(args, settings)
    store = ModelStore(device=args.device, runs_dir=args.runs_dir, max_loaded=args.max_loaded_adapters,
                       precision=args.precision, compile=args.compile)
    _allow_pixels(args.max_pixels)
    runs = _named_runs(args.runs)
    _note_precision(args.precision, store, [folder for _, folder in runs])
    if store.runs_dir:
        print(f"serving the {len(store.available())} finished runs in {store.runs_dir} (and any added later) on "
              f"demand, at most {store.max_loaded} loaded", flush=True)
    print(f"listening on http://{args.host}:{args.port}" + (f", loading {len(runs)} runs (ready at /v2/health/ready "
                                                            "once loaded)" if runs else ""), flush=True)
    server = VisionServer(store, settings, preload=runs, announce=_announce)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's decompression-bomb limit to ``--max-pixels`` where that is higher, so the server's own
    limit (checked from the header, before decoding) is the one that holds."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _named_runs(items: list[str]) -> list[tuple[str, str]]:
    """(name, folder) of each ``[NAME=]RUN`` given, each checked to be a finished run (one line if not);
    the weights load once the server listens."""
    from visionlora.deploy.runs import open_run

    runs, names = [], set()
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(path).resolve().name
        if name in names:
            raise VisionLoraError(f"a model named {name!r} is already served; name one NAME=RUN")
        open_run(path)
        names.add(name)
        runs.append((name, path))
    return runs


def _announce(served) -> None:
    """One line per run loaded at start: its task, mode, folder and the runs sharing its base."""
    others = served.describe()["shares_base_with"]
    shared = f", sharing its base with {', '.join(others)}" if others else ""
    print(f"serving {served.name}: {served.task.name} {served.info.mode} run {served.paths.root}{shared}; precision "
          f"{served.base.precision.line() if served.base.precision else 'fp32'}", flush=True)
    if served.base.compile_seconds is not None:
        print(f"compiled {served.name} (torch.compile): warm-up {served.base.compile_seconds:.1f} s", flush=True)


def _guard_settings(args) -> dict:
    """The API key (--api-key, else the environment variable) and the request limits; listening beyond
    loopback without a key is refused unless --allow-unauthenticated."""
    import os

    from visionlora.serving import API_KEY_VARIABLE

    key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    if key is None and not args.allow_unauthenticated and not _loopback(args.host):
        raise VisionLoraError(f"--host {args.host} listens beyond this machine: give an API key (--api-key, or "
                              f"{API_KEY_VARIABLE}) or --allow-unauthenticated")
    for flag, value in (("--max-pixels", args.max_pixels), ("--max-queue", args.max_queue),
                        ("--timeout-s", args.timeout_s)):
        if value is not None and value <= 0:
            raise VisionLoraError(f"{flag} must be above 0, not {value:g}")
    return {"api_key": key, "public_metrics": args.public_metrics, "max_pixels": args.max_pixels,
            "max_queue": args.max_queue, "timeout_s": args.timeout_s}


def _loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _device_on_ray(device: str, where: str) -> None:
    """Refuse a ``--device`` other than auto on Ray, whose workers take the devices Ray gives them."""
    if device.strip().lower() != "auto":
        raise VisionLoraError(f"--device {device} does not apply to {where}")


def _note_precision(precision: str, store, runs: list[str]) -> None:
    """One line each where ``--precision bf16`` is emulated on the store's device, or leaves ONNX exports as
    they are (the ``runs`` given, and any under --runs-dir)."""
    if precision != "bf16":
        return
    import torch

    from visionlora.deploy.onnx_model import ONNX_PRECISION_NOTE
    from visionlora.deploy.runs import open_run
    from visionlora.runtime import bf16_note

    note = bf16_note(torch.device(store.device))
    if note:
        _tell(f"note: {note}")
    folders = [Path(run) for run in runs]
    folders += [store.runs_dir / name for name in store.available()] if store.runs_dir else []
    onnx = sorted({str(folder) for folder in folders if open_run(folder).is_onnx})
    if onnx:
        _tell(f"note: {ONNX_PRECISION_NOTE}: {', '.join(onnx)}")


def _serve_on_ray(args, settings) -> int:
    try:
        from visionlora.serving.ray import command_settings, run_on_ray
    except ImportError as err:
        raise VisionLoraError(f"--ray needs Ray Serve ({err.name} is missing): pip install 'visionlora[ray]'") from None
    ray_settings = command_settings(args.runs_dir, args.runs, settings, max_loaded=args.max_loaded_adapters,
                                    replicas=args.replicas, replica_cpus=args.replica_cpus,
                                    replica_gpus=args.replica_gpus, max_ongoing_requests=args.max_ongoing_requests,
                                    autoscaling=args.autoscaling)
    run_on_ray(ray_settings, args.host, args.port, args.ray_address)
    return 0


def _cmd_export(args) -> int:
    from visionlora.deploy.export import export_run

    if args.format == "onnx-adapters":
        return _export_adapters(args)
    if len(args.run_dirs) > 1:
        raise VisionLoraError(f"--format {args.format} exports one run; several runs go to --format onnx-adapters")
    args.run_dir = args.run_dirs[0]
    record = export_run(args.run_dir, args.output, args.format, args.overwrite, quantize=args.quantize,
                        max_metric_drop=args.max_metric_drop, timing=True)
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
    engines = record["engines"]
    speeds = ", ".join(f"{name} {speed:.1f}" for name, speed in sorted(engines["images_per_second"].items(),
                                                                         key=lambda item: -item[1]))
    skipped = f"; not timed: {engines['skipped']}" if "skipped" in engines else ""
    print(f"fastest here: {engines['fastest']} (images/s on {engines['images']} images in one batch: {speeds}"
          f"{skipped})")
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


def _cmd_select(args) -> int:
    from visionlora.deploy.predictor import image_files, load_run
    from visionlora.deploy.selection import select

    _use_threads(args)
    files = list(image_files(args.images))
    if not files:
        raise VisionLoraError(f"no image files found in: {' '.join(args.images)}")
    run = load_run(args.run_dir, args.device, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                   allow_base_change=args.allow_base_change)
    sheet = Path(args.sheet) if args.sheet else Path(args.output).with_suffix(".png")
    paths, scores, scored = select(run, files, args.count, Path(args.output), sheet, " ".join(args.images))
    if scored.skipped:
        _tell(f"skipped {len(scored.skipped)} unreadable file(s): "
              + "; ".join(f"{s['file']} ({s['reason']})" for s in scored.skipped))
    _tell(f"picked {len(paths)} of {len(scored.files)} images (uncertainty {min(scores):.2f} to {max(scores):.2f}); "
          f"wrote {args.output} and {sheet}")
    return 0


def _cmd_demo(args) -> int:
    from visionlora.demo import run_demo

    run_demo(Path(args.output))
    return 0


def _cmd_check(args) -> int:
    from visionlora.checking.run import FoldSettings, check, exit_code
    from visionlora.tasks import DEFAULT_TASK

    folds = None
    if args.label_errors:
        yaml_values = {}
        if args.config:
            from visionlora.config import load_yaml

            yaml_values = load_yaml(args.config)
        folds = FoldSettings(args.folds, args.epochs, args.seed, yaml_values)
    elif args.folds or args.config:
        raise VisionLoraError("--folds and --config set up --label-errors: add --label-errors")
    result, lines, written = check(args.data, args.task or DEFAULT_TASK, val_data=args.val_data, model=args.model,
                                   image_size=args.image_size, output=args.output, progress=args.progress,
                                   folds=folds, say=_tell)
    for line in lines:
        print(line)
    _tell(" and ".join(str(path) for path in written) + " written")
    return exit_code(result, args.strict)


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


HANDLERS = {"train": _cmd_train, "train-many": _cmd_train_many, "tune": _cmd_tune, "evaluate": _cmd_evaluate,
            "predict": _cmd_predict, "compare": _cmd_compare, "serve": _cmd_serve, "export": _cmd_export,
            "demo": _cmd_demo, "check": _cmd_check, "select": _cmd_select}
