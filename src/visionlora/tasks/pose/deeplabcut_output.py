"""Pose predictions in DeepLabCut's table layout: ``--csv`` and ``--h5``.

One row per image or video frame. Columns are ``(scorer, bodyparts, coords)`` with coords
``x``, ``y``, ``likelihood``; with more than one instance in a frame, or with tracks, DeepLabCut's
multi-animal layout ``(scorer, individuals, bodyparts, coords)``. A tracked video's instances
are named by their track (``individual3`` is track 3 in every frame; an instance without a
track is left out). Untracked, instances are named ``individual1``, ``individual2``... in the
order they were found in each frame (the detector's order), so the same name in two frames
need not be the same animal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from visionlora.artifacts import atomic_write_bytes, atomic_write_with
from visionlora.core.outputs import OutputWriter
from visionlora.errors import VisionLoraError

SCORER = "visionlora"
H5_KEY = "df_with_missing"  # the key DeepLabCut writes and reads
# missing values written out: pandas reads a first row left all empty (a frame without an
# animal, as a tracked video's first frame is) as the index's name, not as a frame
NA = "NaN"


def dlc_table(predictions: Sequence[dict], scorer: str = SCORER):
    """A pandas DataFrame of pose predictions in DeepLabCut's layout."""
    import numpy as np
    import pandas as pd

    bodyparts = next(([k["name"] for k in i["keypoints"]] for p in predictions for i in p["instances"]), [])
    slots = [_slots(p["instances"]) for p in predictions]
    names = sorted({name for frame in slots for name in frame})
    tracked = any("track_id" in i for p in predictions for i in p["instances"])
    levels = [[scorer], bodyparts, ["x", "y", "likelihood"]]
    header = ["scorer", "bodyparts", "coords"]
    if tracked or len(names) > 1:
        levels.insert(1, [f"individual{name}" for name in names])
        header.insert(1, "individuals")
    columns = pd.MultiIndex.from_product(levels, names=header)
    values = np.full((len(predictions), len(columns)), np.nan)
    width = len(bodyparts) * 3
    for row, frame in enumerate(slots):
        for name, instance in frame.items():
            slot = names.index(name)
            values[row, slot * width:(slot + 1) * width] = [
                v for k in instance["keypoints"] for v in (k["x"], k["y"], k["score"])]
    index = [p["image"] if "image" in p else p["frame"] for p in predictions]
    return pd.DataFrame(values, columns=columns, index=index)


def _slots(instances: Sequence[dict]) -> dict[int, dict]:
    """One frame's instances by individual number: the track's, or the order found without tracks."""
    if any("track_id" in instance for instance in instances):
        return {instance["track_id"]: instance for instance in instances if instance.get("track_id") is not None}
    return {number: instance for number, instance in enumerate(instances, start=1)}


def write_csv(target: Path, predictions: Sequence[dict], images, draw) -> None:
    try:
        atomic_write_bytes(Path(target), dlc_table(predictions).to_csv(na_rep=NA).encode())
    except OSError as err:
        raise VisionLoraError(f"{target}: cannot write: {err.strerror or err}") from None


def write_h5(target: Path, predictions: Sequence[dict], images, draw) -> None:
    import importlib.util

    if importlib.util.find_spec("tables") is None:
        raise VisionLoraError(f"--h5 {target}: pandas needs PyTables to write HDF5 (pip install tables)")
    table = dlc_table(predictions)
    try:
        atomic_write_with(Path(target), lambda path: table.to_hdf(path, key=H5_KEY, mode="w"))
    except OSError as err:
        raise VisionLoraError(f"{target}: cannot write: {err.strerror or err}") from None


DLC_CSV = OutputWriter("csv", "write keypoints as a DeepLabCut CSV (3 header rows; 4 with several instances "
                       "or with --track)", "FILE.csv", write_csv)
DLC_H5 = OutputWriter("h5", "write keypoints as a DeepLabCut HDF5 table (needs PyTables)", "FILE.h5", write_h5)
