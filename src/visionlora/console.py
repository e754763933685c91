"""What a run prints, and where library chatter goes instead (the run's log file)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "py.warnings")


def quiet_libraries() -> None:
    """Keep library warnings, deprecation notes and download bars out of the terminal."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def library_messages_to(log_file: Path) -> Iterator[None]:
    """Within the block, send Python warnings and the libraries' log records to ``log_file`` only."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    for logger in loggers:
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for logger, (level, propagate, handlers) in zip(loggers, saved):
                logger.handlers, logger.propagate = handlers, propagate
                logger.setLevel(level)
            hf_logging.set_verbosity(verbosity)
            handler.close()


METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT"}


def describe_start(cfg: Any, counts: dict[str, Any], skipped: int, params: dict[str, Any],
                   resolved_targets: Sequence[str] | None, root: Path) -> str:
    """One line: task, mode and adapter, model, data counts, trainable parameters, run folder."""
    adapter = (f", {METHOD_NAMES[cfg.method]} r={cfg.lora_r} on {', '.join(resolved_targets)}"
               if resolved_targets else "")
    skipped_text = f", {skipped} files skipped" if skipped else ""
    return (
        f"{cfg.task} | {cfg.mode}{adapter} | model {cfg.model} | "
        f"{counts['train']} train / {counts['val']} val images{skipped_text} | "
        f"{params['trainable']:,} of {params['total']:,} parameters trainable "
        f"({params['trainable_percent']:.2f}%) | run {root}"
    )


def describe_epoch(row: dict[str, Any], epochs: int, main_metric: str, improved: bool) -> str:
    """One line per epoch: losses, the main metric (starred when it improved) and seconds."""
    main = row.get(f"val_{main_metric}")
    marker = " *" if improved else ""
    return (
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  {main_metric} {main:.4f}{marker}  ({row['seconds']:.1f}s)"
    )
