"""The GPU check script's dry run: every step of it (train, resume, predict and evaluate, serve with
mixed adapters, ONNX, throughput) runs on the CPU with tiny models and reports ok."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_dry_run_passes_every_step(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(tmp_path)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [line.split() for line in completed.stdout.splitlines()]
    results = {row[0]: row[1] for row in rows  # the table's rows: step, result, seconds, detail
               if len(row) > 2 and row[1] in ("ok", "FAIL") and not row[0].endswith(":")}
    assert results == dict.fromkeys(["train", "resume", "predict+evaluate", "serve", "onnx", "packed",
                                     "throughput"], "ok")
