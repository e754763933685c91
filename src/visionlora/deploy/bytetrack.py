"""Roboflow's ByteTrack (``trackers`` 2.1), fed one frame's boxes as numpy arrays, per label.

trackers 2.1 slices its input ``sv.Detections`` one box at a time, deep-copies each slice, sets
the copy's ``tracker_id`` and merges the copies into its answer, and supervision validates every
``Detections`` it builds and merges: on a few boxes, half the tracker's time. :class:`Rows`
gives it the same boxes as a ``Detections`` that slices without validation and copies
shallowly, and keeps the copies: their ids are read from them, and they leave the merge out
(it answers an empty ``Detections`` at no cost). The tracking itself (Kalman filters, the two
associations, track births and deaths) is the library's, unchanged.

A track is confirmed by its second box (trackers' ``minimum_consecutive_frames``); the box
that started it, one frame before, is reported with it, so that a confirmed track is named
from its first box on (see :meth:`LabelTracks.update`).
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

Named = list[tuple[int, int]]  # (the box's index in its frame, the library's track id)


class Rows(sv.Detections):
    """Boxes, their scores and their indices in the frame (as ``class_id``), cheap to slice and copy.

    Slices skip supervision's validation (their fields agree by construction) and share
    ``copies``; a copy is shallow (the tracker only reassigns a copy's ``tracker_id``, never
    writes into its arrays), is kept in ``copies`` and says it is empty, so that the tracker's
    final ``Detections.merge`` leaves it out.
    """

    copies: list[Rows]  # the copies the tracker made this frame, shared by the frame's slices
    is_copy: bool

    @classmethod
    def of(cls, xyxy: np.ndarray, confidence: np.ndarray | None, index: np.ndarray | None,
           tracker_id: np.ndarray | None = None, copies: list[Rows] | None = None, copy: bool = False) -> Rows:
        rows = object.__new__(cls)
        rows.__dict__.update(xyxy=xyxy, mask=None, confidence=confidence, class_id=index, tracker_id=tracker_id,
                             data={}, metadata={}, copies=[] if copies is None else copies, is_copy=copy)
        return rows

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            return super().__getitem__(index)
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1)
        confidence, frame_index, tracker_id = (None if column is None else column[index]
                                               for column in (self.confidence, self.class_id, self.tracker_id))
        return Rows.of(self.xyxy[index], confidence, frame_index, tracker_id, self.copies)

    def __deepcopy__(self, memo: dict) -> Rows:
        copied = Rows.of(self.xyxy, self.confidence, self.class_id, self.tracker_id, self.copies, copy=True)
        self.copies.append(copied)
        return copied

    def is_empty(self) -> bool:
        return self.is_copy or super().is_empty()

    def answer(self) -> list[tuple[int, np.ndarray, int]]:
        """(index in the frame, box, track id: -1 for none) of each box the tracker gave back."""
        return [(int(np.asarray(rows.class_id)[0]), rows.xyxy[0], int(np.asarray(rows.tracker_id)[0]))
                for rows in self.copies]


class LabelTracks:
    """One label's ByteTrack; also names the box that started each track it confirms."""

    def __init__(self, **options: Any):
        self.tracker = ByteTrackTracker(**options)
        self.births: dict[Any, int] = {}  # each track started in the last frame: the index of its box there

    def update(self, xyxy: np.ndarray, confidence: np.ndarray, index: np.ndarray) -> tuple[Named, Named]:
        """The (index, track id) of this frame's tracked boxes, and of the previous frame's boxes
        that started the tracks confirmed in this frame (``index``: each box's index in its frame)."""
        frame = Rows.of(xyxy, confidence, index)
        self.tracker.update(frame)
        found = frame.answer()
        named = [(i, t) for i, _, t in found if t >= 0]
        confirmed = [(self.births[track], int(track.tracker_id)) for track in self.tracker.tracks
                     if track.tracker_id >= 0 and track in self.births]
        self.births = self._born(found)
        return named, confirmed

    def _born(self, found: list[tuple[int, np.ndarray, int]]) -> dict[Any, int]:
        """The tracks started in this frame, with the index of their box (a new track's state is its box)."""
        new = [track for track in self.tracker.tracks
               if track.tracker_id < 0 and track.number_of_successful_updates == 1 and track.time_since_update == 0]
        if not new:
            return {}
        unnamed = [(i, box) for i, box, t in found if t < 0]
        born = {}
        for track in new:
            start = next((i for i, box in unnamed if np.array_equal(box, track.state[:4, 0])), None)
            if start is not None:
                born[track] = start
        return born


class ByteTrack:
    """Per frame, boxes (x0, y0, x1, y1), scores and labels in; a track key per box out (None: not
    tracked in this frame), and the boxes of the frame before that started tracks confirmed in
    this one. One ByteTrack per label; keys, ``(label, the library's id)``, are unique in the video."""

    def __init__(self, **options: Any):
        self.options = options
        self._labels: dict[Hashable, LabelTracks] = {}

    def update(self, boxes: Sequence[Sequence[float]], scores: Sequence[float], labels: Sequence[Hashable]
               ) -> tuple[list[tuple[Hashable, int] | None], list[tuple[int, tuple[Hashable, int]]]]:
        """(the track key of each box, in the boxes' order; (index in the previous frame, key) of
        the boxes there whose tracks were confirmed now)."""
        xyxy = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        confidence = np.asarray(scores, dtype=np.float32).reshape(-1)
        groups: dict[Hashable, list[int]] = {}
        for place, label in enumerate(labels):
            groups.setdefault(label, []).append(place)
        keys: list[tuple[Hashable, int] | None] = [None] * len(xyxy)
        confirmed: list[tuple[int, tuple[Hashable, int]]] = []
        for label in groups.keys() | self._labels.keys():  # a label without boxes now still ages its tracks
            chosen = np.asarray(groups.get(label, ()), dtype=np.int64)
            tracks = self._labels.get(label) or self._labels.setdefault(label, LabelTracks(**self.options))
            named, started = tracks.update(xyxy[chosen], confidence[chosen], chosen)
            for place, raw in named:
                keys[place] = (label, raw)
            confirmed += [(place, (label, raw)) for place, raw in started]
        return keys, confirmed
