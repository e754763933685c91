"""Identities across a video's frames: ByteTrack links each frame's boxes to the tracks of the
frames before, so that a box's ``track_id`` names the same object all through the video.

The tracker is Roboflow's ``trackers`` (``pip install 'visionlora[track]'``; see
:mod:`visionlora.deploy.bytetrack`). Boxes are tracked per label. A track is confirmed by its
second box, and then named from its first: the box of the frame before that started it gets
the same ``track_id``. A box whose track is never confirmed (seen in one frame only, or
scoring under the track threshold with no track to continue) has ``track_id`` None.
Identities are numbered 1, 2... in the order their tracks are confirmed. With ``max_individuals``, at
most that many identities are given: a new track takes the identity, free in that frame, whose
last box was nearest, rather than a new one.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from PIL import Image

from visionlora.artifacts import atomic_write_bytes
from visionlora.core.drawing import draw_tracks
from visionlora.errors import VisionLoraError

METHODS = ("bytetrack",)
TRACK_BUFFER = 30  # frames a lost track is kept to be found again
TRACK_THRESH = 0.5  # boxes scoring at least this are matched first and start tracks
MATCH_THRESH = 0.1  # the least IoU of a track's predicted box and a box for the two to match
TRAIL = 20  # frames of each identity's path drawn behind it

Items = Callable[[dict[str, Any]], "list[dict[str, Any]] | None"]


@dataclass(frozen=True)
class TrackSettings:
    """How boxes are linked across frames (recorded in the output as given)."""

    method: str = "bytetrack"
    track_buffer: int = TRACK_BUFFER
    track_thresh: float = TRACK_THRESH
    match_thresh: float = MATCH_THRESH
    max_individuals: int | None = None

    def check(self) -> TrackSettings:
        """These settings, or a one-line error naming the flag out of range."""
        if self.method not in METHODS:
            raise VisionLoraError(f"--track {self.method}: not a tracker (choose from {', '.join(METHODS)})")
        if self.track_buffer < 1:
            raise VisionLoraError(f"--track-buffer must be 1 or more frames, not {self.track_buffer}")
        for flag, value in (("--track-thresh", self.track_thresh), ("--match-thresh", self.match_thresh)):
            if not 0.0 <= value <= 1.0:
                raise VisionLoraError(f"{flag} must be between 0 and 1, not {value}")
        if self.max_individuals is not None and self.max_individuals < 1:
            raise VisionLoraError(f"--max-individuals must be 1 or more, not {self.max_individuals}")
        if importlib.util.find_spec("trackers") is None:
            raise VisionLoraError("--track needs Roboflow's trackers: pip install 'visionlora[track]'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tracker_options(self) -> dict[str, Any]:
        """These settings as Roboflow's ``ByteTrackTracker`` takes them."""
        return dict(lost_track_buffer=self.track_buffer, frame_rate=30.0,  # 30: the buffer counts frames
                    track_activation_threshold=self.track_thresh, minimum_iou_threshold=self.match_thresh,
                    high_conf_det_threshold=self.track_thresh)


@dataclass
class Identities:
    """Track keys to identities 1, 2...; with ``limit``, a new track re-links to the free
    identity whose last box centre is nearest, and gets none while all are in use."""

    limit: int | None = None
    of_track: dict[Hashable, int] = field(default_factory=dict)
    last_centre: dict[int, np.ndarray] = field(default_factory=dict)

    def name(self, keys: Sequence[Hashable | None], boxes: Sequence[Sequence[float]]) -> list[int | None]:
        """The identity of each box of one frame (None for a box without a track)."""
        busy = {self.of_track[key] for key in keys if key in self.of_track}
        names: list[int | None] = []
        for key, box in zip(keys, boxes):
            centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
            if key is not None and key not in self.of_track:
                free = self._free_identity(centre, busy)
                if free is not None:
                    self._relink(key, free)
                    busy.add(free)
            identity = self.of_track.get(key) if key is not None else None
            if identity is not None:
                self.last_centre[identity] = centre
            names.append(identity)
        return names

    def _free_identity(self, centre: np.ndarray, busy: set[int]) -> int | None:
        if self.limit is None or len(self.last_centre) < self.limit:
            return len(self.last_centre) + 1
        free = [identity for identity in self.last_centre if identity not in busy]
        if not free:
            return None
        return min(free, key=lambda identity: float(np.linalg.norm(self.last_centre[identity] - centre)))

    def _relink(self, key: Hashable, identity: int) -> None:
        for old in [old for old, named in self.of_track.items() if named == identity]:
            del self.of_track[old]  # the lost track gives its identity up
        self.of_track[key] = identity
        self.last_centre.setdefault(identity, np.zeros(2))

    @property
    def count(self) -> int:
        return len(self.last_centre)


class VideoTracker:
    """Follows one video's predictions in frame order: ``follow(prediction)`` sets ``track_id`` on
    each item ``items`` finds in it (a task's boxes or instances), ``drawer`` adds IDs and trails."""

    def __init__(self, settings: TrackSettings, items: Items):
        from visionlora.deploy.bytetrack import ByteTrack

        self.settings, self.items = settings, items
        self.tracker = ByteTrack(**settings.tracker_options())
        self.previous: list[dict[str, Any]] = []  # the last frame's items, named when their tracks are confirmed
        self.identities = Identities(settings.max_individuals)
        self.trails: dict[int, deque[tuple[float, float]]] = {}

    def follow(self, prediction: dict[str, Any]) -> None:
        found = self.items(prediction) or []
        boxes = [item["box"] for item in found]
        keys, confirmed = self.tracker.update(boxes, [float(item.get("score", 1.0)) for item in found],
                                              [item.get("label") for item in found])
        for item, identity in zip(found, self.identities.name(keys, boxes)):
            item["track_id"] = identity
        started = [self.previous[place] for place, _ in confirmed]
        for item, (_, key) in zip(started, confirmed):
            identity = self.identities.of_track.get(key)
            if all(other.get("track_id") != identity for other in self.previous if other is not item):
                item["track_id"] = identity  # an identity another box of that frame holds stays that box's
        self._extend_trails(started + found)
        self.previous = found

    def _extend_trails(self, found: list[dict[str, Any]]) -> None:
        for item in found:
            if item["track_id"] is not None:
                x0, y0, x1, y1 = item["box"]
                trail = self.trails.setdefault(item["track_id"], deque(maxlen=TRAIL))
                trail.append(((x0 + x1) / 2, (y0 + y1) / 2))

    def drawer(self, draw: Callable[[Image.Image, dict], Image.Image]) -> Callable[[Image.Image, dict], Image.Image]:
        """``draw``, then each tracked item's ID and the trail of its last frames."""
        def draw_tracked(image: Image.Image, prediction: dict) -> Image.Image:
            tracked = [item for item in self.items(prediction) or [] if item.get("track_id") is not None]
            shown = {item["track_id"]: list(self.trails.get(item["track_id"], ())) for item in tracked}
            return draw_tracks(draw(image, prediction), [(item["track_id"], item["box"]) for item in tracked], shown)

        return draw_tracked

    def summary(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), "identities": self.identities.count}


def mot_lines(frames: Sequence[dict[str, Any]], items: Items) -> list[str]:
    """MOT Challenge rows ``frame,id,x,y,w,h,score,-1,-1,-1`` of the tracked items; a frame's
    number is its index in the video plus one (MOT counts from 1)."""
    lines = []
    for position, prediction in enumerate(frames):
        number = int(prediction.get("frame", position)) + 1
        for item in items(prediction) or []:
            if item.get("track_id") is None:
                continue
            x0, y0, x1, y1 = item["box"]
            lines.append(f"{number},{item['track_id']},{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f},"
                         f"{float(item.get('score', 1.0)):.4f},-1,-1,-1")
    return lines


def write_mot(target: Path, frames: Sequence[dict[str, Any]], items: Items) -> None:
    """Write :func:`mot_lines` to ``target``."""
    text = "".join(line + "\n" for line in mot_lines(frames, items))
    try:
        atomic_write_bytes(Path(target), text.encode())
    except OSError as err:
        raise VisionLoraError(f"{target}: cannot write: {err.strerror or err}") from None
