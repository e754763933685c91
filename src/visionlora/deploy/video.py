"""Predict on videos: frames stream from OpenCV in batches (memory does not grow with the
video's length), and drawn videos are written at the source's frame rate.

Drawn videos are H.264 (``libx264`` from imageio-ffmpeg's bundled ffmpeg), which browsers
play; without imageio-ffmpeg, OpenCV's MPEG-4 Part 2 (``mp4v``) is written and said so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from visionlora.artifacts import atomic_write_json, current_umask
from visionlora.deploy.tracking import Items, TrackSettings, VideoTracker, write_mot
from visionlora.errors import VisionLoraError

if TYPE_CHECKING:
    from visionlora.deploy.predictor import BoxFinder, LoadedRun

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")
FRAME_BATCH = 16

Predict = Callable[[list[Image.Image]], list[dict[str, Any]]]
Draw = Callable[[Image.Image, dict], Image.Image]


def is_video(path: str | Path) -> bool:
    return is_stream(path) or Path(path).suffix.lower() in VIDEO_SUFFIXES


def is_stream(source: str | Path) -> bool:
    """A camera's index (``0``, unless a file or folder has that name) or a stream's URL
    (``rtsp://...``), which OpenCV opens as it comes."""
    text = str(source)
    return (text.isdigit() and not Path(text).exists()) or "://" in text


@dataclass
class VideoFacts:
    path: str
    fps: float
    frames: int  # as the container says; counted while reading when it does not
    width: int
    height: int


def open_video(path: str | Path):
    """(an OpenCV capture, its facts); an unreadable video or one without frames is a one-line error."""
    import cv2

    if is_stream(path):
        return _open_stream(str(path))
    path = Path(path)
    if not path.is_file():
        raise VisionLoraError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VisionLoraError(f"{path}: cannot read this video (OpenCV cannot open it: not a video, or damaged)")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise VisionLoraError(f"{path}: the video has no frames that can be decoded")
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    facts = VideoFacts(str(path), fps if fps > 0 else 30.0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0),
                       first.shape[1], first.shape[0])
    return capture, facts


def _open_stream(source: str):
    """(an OpenCV capture, its facts) of a camera or stream; its frame count is unknown (0)."""
    import cv2

    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok or first is None:
        capture.release()
        raise VisionLoraError(f"{source}: OpenCV cannot open this camera or stream, or reads no frame from it")
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # a recording seen as a stream starts again; a live one goes on
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    return capture, VideoFacts(source, fps if fps > 0 else 30.0, 0, first.shape[1], first.shape[0])


def frames(capture, facts: VideoFacts, every: int = 1, start: float = 0.0,
           end: float | None = None) -> Iterator[tuple[int, float, Image.Image]]:
    """(frame index, time in seconds, RGB image) of every ``every``-th frame from ``start`` to ``end`` seconds."""
    import cv2

    first = int(round(start * facts.fps))
    if first:
        capture.set(cv2.CAP_PROP_POS_FRAMES, first)
    index = first
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        time = index / facts.fps
        if end is not None and time > end:
            return
        if (index - first) % every == 0:
            yield index, time, Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        index += 1


class VideoWriter:
    """Frames in, a video out at ``path`` (written under a temporary name, renamed on close)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self.path, self.fps, self.size = Path(path), fps, size
        self._frames: list[np.ndarray] = []
        self.codec = "h264" if _has_ffmpeg() else "mp4v"

    def write(self, image: Image.Image) -> None:
        self._frames.append(np.asarray(image.convert("RGB").resize(self.size)))
        if len(self._frames) >= FRAME_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not hasattr(self, "_sink"):
            self._open()
        for frame in self._frames:
            self._send(frame)
        self._frames.clear()

    def _open(self) -> None:
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.stem}.",
                                             suffix=self.path.suffix, delete=False)
        handle.close()
        self._temporary = Path(handle.name)
        if self.codec == "h264":
            import imageio_ffmpeg

            self._sink = imageio_ffmpeg.write_frames(str(self._temporary), self.size, fps=self.fps, codec="libx264",
                                                     pix_fmt_out="yuv420p", macro_block_size=2, quality=None,
                                                     output_params=["-crf", "20"], ffmpeg_log_level="error")
            self._sink.send(None)
            self._send, self._finish = self._sink.send, self._sink.close
        else:
            import cv2

            self._sink = cv2.VideoWriter(str(self._temporary), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, self.size)
            self._send = lambda frame: self._sink.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            self._finish = self._sink.release

    def close(self) -> None:
        """Finish the file and move it into place."""
        self._flush()
        self._finish()
        os.chmod(self._temporary, 0o666 & ~current_umask())
        os.replace(self._temporary, self.path)

    def abandon(self) -> None:
        if hasattr(self, "_temporary"):
            try:
                self._finish()
            except Exception:  # noqa: BLE001 - the encoder may already be broken; the file goes anyway
                pass
            self._temporary.unlink(missing_ok=True)


def _has_ffmpeg() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError):
        return False


def predict_video(path: str | Path, predict: Predict, draw: Draw, every: int = 1, start: float = 0.0,
                  end: float | None = None, save_video: Path | None = None, progress: bool = True,
                  tracker: VideoTracker | None = None) -> dict[str, Any]:
    """``{"video", "fps", "frames": [{"frame", "time", ...prediction}]}`` for the chosen frames,
    predicted FRAME_BATCH at a time; with ``save_video``, each chosen frame drawn.

    With ``tracker``, each frame's predictions are followed in frame order (a ``track_id`` on each
    box or instance), the drawn video shows IDs and trails, and ``"tracking"`` holds its settings.
    """
    from tqdm.auto import tqdm

    if every < 1:
        raise VisionLoraError(f"--every must be 1 or more, not {every}")
    if start < 0 or (end is not None and end <= start):
        raise VisionLoraError(f"--start {start} / --end {end}: need 0 <= start < end (seconds)")
    if is_stream(path) and end is None:
        raise VisionLoraError(f"{path}: a camera or stream needs --end SECONDS (how much of it to predict)")
    capture, facts = open_video(path)
    writer = VideoWriter(save_video, facts.fps / every, (facts.width, facts.height)) if save_video else None
    last = facts.frames if end is None else min(facts.frames, int(end * facts.fps) + 1)
    total = max(0, -(-(last - int(round(start * facts.fps))) // every)) if facts.frames else None
    follow = tracker.follow if tracker is not None else None
    if tracker is not None:
        draw = tracker.drawer(draw)
    try:
        name = str(path) if is_stream(path) else Path(path).name
        bar = tqdm(total=total, desc=name, unit="frame", disable=not progress, leave=False)
        results: list[dict[str, Any]] = []
        for batch in _batches(frames(capture, facts, every, start, end)):
            results += _finish_batch(batch, predict([image for _, _, image in batch]), draw, writer, follow)
            bar.update(len(batch))
        bar.close()
        if not results:
            raise VisionLoraError(f"{path}: no frames between --start {start} and --end {end}")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        capture.release()
    answer = {"video": str(path), "fps": facts.fps, "every": every, "frames": results}
    if tracker is not None:
        answer["tracking"] = tracker.summary()
    if writer is not None:
        answer["drawn_video"] = {"path": str(save_video), "codec": writer.codec, "fps": facts.fps / every}
    return answer


def predict_videos(run: LoadedRun, videos: Sequence[str | Path], options: dict[str, Any], outputs: Mapping[str, Path],
                   finder: BoxFinder | None = None, every: int = 1, start: float = 0.0, end: float | None = None,
                   save_video: Path | None = None,
                   tell: Callable[[str], None] = lambda line: None, tracking: TrackSettings | None = None,
                   mot: Path | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Predict each video's frames with ``run`` and write the ``outputs`` its task's writers name;
    the answer is one video's result (see :func:`predict_video`), or a list of them.

    JSON and DeepLabCut tables cover one video at a time, and so do ``save_video`` and ``mot``
    (MOT Challenge text of the tracks). With ``tracking``, each video's boxes or instances are
    tracked by a tracker of their own. ``tell`` hears one line for each file written.
    """
    if len(videos) > 1 and (save_video or mot or set(outputs) - {"output"}):
        raise VisionLoraError("--save-video, --mot, --csv and --h5 take one video at a time")
    if "save_images" in outputs:
        raise VisionLoraError("--save-images is for images; for a video, use --save-video OUT.mp4")
    items = _tracked_items(run, tracking, mot)
    predict = run.predictor(options, finder)
    results = []
    for video in videos:
        tracker = VideoTracker(tracking, items) if tracking is not None and items is not None else None
        results.append(predict_video(video, predict, run.draw, every, start, end, save_video, progress=True,
                                     tracker=tracker))
        if save_video:
            drawn = results[-1]["drawn_video"]
            tell(f"wrote {drawn['path']} ({drawn['codec']}, {drawn['fps']:g} fps)")
    if mot is not None and items is not None:
        write_mot(mot, results[0]["frames"], items)
        tell(f"wrote {mot}")
    for writer in run.task.writers:
        if writer.name in outputs and writer.name != "output":
            writer.write(outputs[writer.name], results[0]["frames"], [], run.draw)
            tell(f"wrote {outputs[writer.name]}")
    answer = results[0] if len(results) == 1 else results
    if "output" in outputs:
        atomic_write_json(outputs["output"], answer)
        tell(f"wrote {outputs['output']}")
    return answer


Frame = tuple[int, float, Image.Image]


def _batches(source: Iterator[Frame]) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for item in source:
        batch.append(item)
        if len(batch) == FRAME_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _finish_batch(batch: Sequence[Frame], predictions: list[dict[str, Any]], draw: Draw, writer: VideoWriter | None,
                  follow: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One batch's predictions followed by the tracker (in frame order), drawn and written."""
    if follow is not None:
        for prediction in predictions:
            follow(prediction)
    if writer is not None:
        for (_, _, image), prediction in zip(batch, predictions):
            writer.write(draw(image, prediction))
    return [{"frame": index, "time": round(time, 4), **prediction}
            for (index, time, _), prediction in zip(batch, predictions)]


def _tracked_items(run: LoadedRun, tracking: TrackSettings | None, mot: Path | None) -> Items | None:
    """The hook that finds the items a tracker follows in ``run``'s predictions; None without tracking."""
    from visionlora.tasks.roles.prediction import TaskPrediction

    if tracking is None:
        if mot is not None:
            raise VisionLoraError("--mot writes tracks: add --track")
        return None
    tracking.check()
    if type(run.task.prediction).tracked is TaskPrediction.tracked:
        raise VisionLoraError(f"--track follows boxes, and {run.task.name} predictions have none")
    return run.task.prediction.tracked
