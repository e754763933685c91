"""Multi-object tracking metrics of boxes with identities, computed in memory: motmetrics' IDF1,
identity switches and MOTA, and trackeval's HOTA (its own metric class, fed the per-frame IoUs).

Tracks are read from MOT Challenge text (``frame,id,x,y,w,h,...``, frames counted from 1), the
format ``predict --mot`` writes and generated benchmark videos come with. motmetrics and trackeval
are imported when a score is computed, not with this module.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

Tracks = dict[int, list[tuple[int, list[float]]]]  # frame number: [(identity, [x, y, w, h]), ...]


def parse_mot(text: str) -> Tracks:
    """The boxes of MOT Challenge rows by frame; columns after the box (score, -1...) are ignored."""
    tracks: Tracks = defaultdict(list)
    for line in text.splitlines():
        if line.strip():
            frame, identity, *box = line.split(",")[:6]
            tracks[int(float(frame))].append((int(float(identity)), [float(value) for value in box]))
    return dict(tracks)


def read_mot(path: Path) -> Tracks:
    """:func:`parse_mot` of a file."""
    return parse_mot(Path(path).read_text())


def identity_scores(truth: Tracks, found: Tracks, iou: float = 0.5) -> dict[str, float]:
    """motmetrics' IDF1, identity switches (``num_switches``) and MOTA of ``found`` against
    ``truth``, a box matching a true box at IoU ``iou`` or more."""
    import motmetrics

    accumulator = motmetrics.MOTAccumulator(auto_id=False)
    for frame in sorted(set(truth) | set(found)):
        objects, hypotheses = truth.get(frame, []), found.get(frame, [])
        distances: np.ndarray = np.empty((len(objects), len(hypotheses)))
        if objects and hypotheses:
            overlap = motmetrics.distances.boxiou(_boxes(objects)[:, None], _boxes(hypotheses)[None, :])
            distances = np.where(overlap >= iou, 1 - overlap, np.nan)
        accumulator.update([i for i, _ in objects], [i for i, _ in hypotheses], distances, frameid=frame)
    summary = motmetrics.metrics.create().compute(accumulator, metrics=["idf1", "num_switches", "mota"])
    return {name: float(summary[name].iloc[0]) for name in ("idf1", "num_switches", "mota")}


def hota(truth: Tracks, found: Tracks) -> dict[str, float]:
    """trackeval's HOTA of ``found`` against ``truth`` as one sequence, with its detection (DetA)
    and association (AssA) parts: each the mean over IoU thresholds 0.05 to 0.95, as trackeval reports them."""
    try:
        from trackeval.metrics import HOTA
    except ImportError:
        raise ImportError("HOTA needs trackeval: pip install --no-deps trackeval==1.3.0 (make setup does; "
                          "its declared opencv-python is not needed)") from None
    result = HOTA().eval_sequence(hota_data(truth, found))
    return {name.lower(): float(np.mean(result[name])) for name in ("HOTA", "DetA", "AssA")}


def hota_data(truth: Tracks, found: Tracks) -> dict[str, Any]:
    """The sequence data trackeval's metrics take: per frame, the identities of the true and the
    found boxes (renumbered 0, 1... over the sequence) and their IoUs, by trackeval's own box IoU."""
    from trackeval.datasets._base_dataset import _BaseDataset

    true_ids = {i: n for n, i in enumerate(sorted({i for rows in truth.values() for i, _ in rows}))}
    found_ids = {i: n for n, i in enumerate(sorted({i for rows in found.values() for i, _ in rows}))}
    data: dict[str, Any] = {"gt_ids": [], "tracker_ids": [], "similarity_scores": [],
                            "num_gt_ids": len(true_ids), "num_tracker_ids": len(found_ids),
                            "num_gt_dets": sum(len(rows) for rows in truth.values()),
                            "num_tracker_dets": sum(len(rows) for rows in found.values())}
    for frame in sorted(set(truth) | set(found)):
        objects, hypotheses = truth.get(frame, []), found.get(frame, [])
        data["gt_ids"].append(np.array([true_ids[i] for i, _ in objects], dtype=int))
        data["tracker_ids"].append(np.array([found_ids[i] for i, _ in hypotheses], dtype=int))
        data["similarity_scores"].append(_BaseDataset._calculate_box_ious(_boxes(objects), _boxes(hypotheses),
                                                                          box_format="xywh"))
    return data


def _boxes(rows: list[tuple[int, list[float]]]) -> np.ndarray:
    return np.array([box for _, box in rows], dtype=float).reshape(-1, 4)
