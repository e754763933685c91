"""The command line and settings: help, YAML merging, presets and one-line errors."""

from __future__ import annotations

import json

import pytest

from visionlora.cli import build_parser, config_from_args, main
from visionlora.config import TrainConfig, with_preset
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["demo"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: visionlora" in capsys.readouterr().out


def test_train_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--task", "--data", "--val-data", "--model", "--mode", "--epochs", "--batch-size", "--lr",
                 "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--image-size", "--seed",
                 "--output", "--config"):
        assert flag in text


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_preset_fills_lora_defaults():
    cfg = _config(["--data", "x"])
    assert (cfg.model, cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.lora_dropout) == (
        "google/vit-base-patch16-224", 16, 32, 2e-4, 0.0)
    assert cfg.target_modules == ["query", "value"] and cfg.mode == "lora"
    assert _config(["--data", "x", "--mode", "full"]).lr == 5e-5


def test_yaml_settings_apply_and_flags_win(tmp_path):
    (tmp_path / "s.yaml").write_text("data: from-yaml\nlora-r: 4\nepochs: 3\ntarget_modules: key,value\nlr: 0.001\n")
    cfg = _config(["--config", str(tmp_path / "s.yaml"), "--epochs", "7"])
    assert (cfg.data, cfg.lora_r, cfg.epochs, cfg.lr) == ("from-yaml", 4, 7, 0.001)
    assert cfg.target_modules == ["key", "value"]


def test_flags_parse_types():
    cfg = _config(["--data", "x", "--lr", "3e-4", "--target-modules", "q_proj, v_proj", "--no-progress",
                   "--image-size", "64"])
    assert cfg.lr == 3e-4 and cfg.target_modules == ["q_proj", "v_proj"] and cfg.progress is False
    assert cfg.image_size == 64


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data: x\nlearning_rate: 0.1\n", "unknown setting 'learning_rate'"),
        ("data: x\nepochs: many\n", "setting 'epochs': 'many' is not a valid"),
        ("- a\n- b\n", "expected a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
        ("data: x\nepochs: 0\n", "--epochs must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, yaml_text, message):
    (tmp_path / "s.yaml").write_text(yaml_text)
    with pytest.raises(VisionLoraError, match=message):
        _config(["--config", str(tmp_path / "s.yaml")])


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nothing-here"), "--model", "tiny", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "no such folder" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_unknown_task_is_a_clear_error(capsys):
    assert main(["train", "--task", "depth", "--data", "x"]) == 2
    assert "unknown task 'depth'; choose one of: classification" in capsys.readouterr().err


def test_evaluate_on_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_train_evaluate_predict_from_the_command_line(class_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(class_folder), "--model", "tiny", "--epochs", "1", "--lr", "1e-3",
                 "--output", str(run), "--no-progress"]) == 0
    assert "best epoch 1: accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(class_folder)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "training_results_lora" / "training_summary.json").read_text())
    assert evaluated["images"] == 24  # the validation part, as in training
    assert evaluated["metrics"]["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(run), str(class_folder / "val" / "red_disc"), str(tmp_path / "broken.png")]) == 0
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)
    assert len(predictions) == 6 and all(p["label"] in {"blue_disc", "green_disc", "red_disc", "yellow_disc"}
                                         for p in predictions)
    assert "skipped 1 unreadable file(s)" in captured.err
    # the output folder is not replaced without --overwrite
    assert main(["train", "--data", str(class_folder), "--model", "tiny", "--epochs", "1", "--output", str(run)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_default_run_names_count_up(class_folder, tmp_path, monkeypatch):
    from visionlora.artifacts import new_run_dir

    monkeypatch.chdir(tmp_path)
    first = new_run_dir("classification", "lora", None, False)
    second = new_run_dir("classification", "lora", None, False)
    assert (str(first), str(second)) == ("runs/classification/lora", "runs/classification/lora-2")


def test_config_validation_needs_data():
    with pytest.raises(VisionLoraError, match="no training data"):
        TrainConfig().validate()


def _resolve(requested: str, task: str) -> tuple[str, str]:
    from visionlora import runtime

    return runtime.resolve_precision(requested, get_task(task).fp16_unsafe)


def test_auto_precision_picks_native_bf16_and_says_why(monkeypatch):
    import torch

    from visionlora import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: "AVX512-BF16")
    assert _resolve("auto", "classification") == ("bf16", "auto: this CPU has AVX512-BF16")
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: None)
    assert _resolve("auto", "pose")[0] == "no"
    assert _resolve("bf16", "pose") == ("bf16", "asked for with --mixed-precision")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert _resolve("auto", "classification")[0] == "fp16"
    precision, reason = _resolve("auto", "detection")
    assert precision == "no" and "overflow in fp16" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert _resolve("auto", "detection")[0] == "bf16"


def test_a_onednn_cap_below_bf16_means_no_native_bf16(monkeypatch):
    import torch

    from visionlora import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True}, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert _resolve("auto", "pose") == ("bf16", "auto: this CPU has AVX512-BF16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert runtime.cpu_bf16_feature() is None
    assert _resolve("auto", "pose") == (
        "no", "auto: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bf16 instructions")


def test_the_summary_records_the_precision_and_fp32_metrics(class_folder, tmp_path):
    from tests.conftest import tiny_config
    from visionlora.training.engine import train

    summary = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=1,
                                mixed_precision="auto")).summary
    expected = _resolve("auto", "classification")
    assert summary["training"]["mixed_precision"] == "auto"
    assert summary["mixed_precision"] == expected[0].replace("no", "fp32")
    assert summary["mixed_precision_reason"] == expected[1]
    assert summary["metrics"]["accuracy"] == pytest.approx(summary["metrics_in_training_precision"]["accuracy"],
                                                           abs=0.2)


def test_class_weights_need_a_task_with_a_class_loss(tmp_path):
    with pytest.raises(VisionLoraError, match="--class-weights: the detection task has no class-weighted loss"):
        TrainConfig(task="detection", data=str(tmp_path), class_weights="auto").validate()
    weighted = TrainConfig(task="classification", data=str(tmp_path), class_weights="auto").validate()
    assert weighted.class_weights == "auto"


def test_unwrapping_mixed_precision_gives_the_model_its_own_forward_back():
    """Accelerate's keep_fp32_wrapper=False strips transformers' forward decorators too (SegFormer
    then fails); unwrap_in_fp32 restores the forward saved at prepare, decorators and all."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from visionlora.runtime import new_accelerator, unwrap_in_fp32

    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
                             strides=[2], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=2)
    model = SegformerForSemanticSegmentation(config).eval()
    accelerator = new_accelerator(cpu=True, mixed_precision="bf16")
    model = unwrap_in_fp32(accelerator, accelerator.prepare(model))
    assert model.forward.__func__ is type(model).forward
    logits = model(pixel_values=torch.randn(1, 3, 16, 16)).logits
    assert logits.dtype == torch.float32 and logits.shape == (1, 2, 8, 8)


def test_the_preset_fills_what_a_config_leaves_unset_in_both_ways_of_building_one():
    built = _config(["--data", "x", "--mode", "full", "--lora-r", "4"])
    direct = with_preset(TrainConfig(data="x", mode="full", lora_r=4))
    assert built == direct
    assert (direct.lora_r, direct.lora_alpha, direct.lr) == (4, 32.0, get_task("classification").preset.lr_full)
    assert isinstance(direct.lora_alpha, float) and direct.target_modules == ["query", "value"]
