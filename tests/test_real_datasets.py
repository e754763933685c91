"""Runs on the real datasets beside the project, when that folder exists (skipped elsewhere)."""

from __future__ import annotations

import pytest

import visionlora
from tests.conftest import SHARED_DATASETS, tiny_config
from visionlora.training.engine import train

HYMENOPTERA = SHARED_DATASETS / "hymenoptera"


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="real datasets folder not present")
def test_hymenoptera_photos_train_end_to_end(tmp_path):
    result = train(tiny_config("classification", HYMENOPTERA, tmp_path / "run", epochs=1, batch_size=32))
    summary = result.summary
    assert summary["data"]["counts"]["train"] == 245 and summary["data"]["counts"]["val"] == 153
    assert summary["data"]["counts"]["train_per_class"] == {"ants": 124, "bees": 121}
    evaluated = visionlora.load(result.paths.root).evaluate(batch_size=32)["metrics"]
    assert evaluated["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
