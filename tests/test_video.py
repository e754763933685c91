"""Predict on videos, DeepLabCut tables, and top-down pose with a detector."""

from __future__ import annotations

import importlib.util
import json

import cv2
import pandas
import pytest
from PIL import Image

from tests.conftest import tiny_config
from visionlora.cli import main
from visionlora.deploy.predictor import box_finder, load_run
from visionlora.deploy.video import open_video
from visionlora.examples.synthetic import POSE_KEYPOINTS, make_detection_dataset, make_pose_dataset, make_pose_video
from visionlora.training.engine import train

FRAMES = 30


@pytest.fixture(scope="module")
def runs(class_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    frames = make_pose_dataset(root / "pose-data", "dlc", n_train=8, n_val=3)
    boxes = make_detection_dataset(root / "boxes-data", "coco", n_train=6, n_val=2)
    return {
        "pose": train(tiny_config("pose", frames, root / "pose", epochs=1)).paths.root,
        "detection": train(tiny_config("detection", boxes, root / "det", epochs=1, model="tiny-rtdetr")).paths.root,
        "classification": train(tiny_config("classification", class_folder, root / "cls", epochs=1)).paths.root,
        "video": make_pose_video(root / "clip.mp4", frames=FRAMES, fps=10),
        "root": root,
    }


def _predict(args, capsys):
    code = main(["predict", *map(str, args), "--precision", "fp32"])  # compared with the fp32 Python API
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_video_json_has_every_chosen_frame(runs, capsys):
    code, out, _ = _predict([runs["classification"], runs["video"]], capsys)
    answer = json.loads(out)
    assert code == 0 and answer["fps"] == pytest.approx(10) and len(answer["frames"]) == FRAMES
    assert [f["frame"] for f in answer["frames"]] == list(range(FRAMES)) and "label" in answer["frames"][0]
    code, out, _ = _predict([runs["classification"], runs["video"], "--every", "3", "--start", "1", "--end", "2"],
                            capsys)
    frames = json.loads(out)["frames"]
    assert [f["frame"] for f in frames] == [10, 13, 16, 19] and frames[0]["time"] == pytest.approx(1.0)


def test_pose_video_writes_deeplabcut_tables_and_a_drawn_video(runs, tmp_path, capsys):
    csv_file, h5_file, drawn = tmp_path / "out.csv", tmp_path / "out.h5", tmp_path / "drawn.mp4"
    code, out, err = _predict([runs["pose"], runs["video"], "--csv", csv_file, "--h5", h5_file,
                               "--save-video", drawn], capsys)
    assert code == 0, err
    table = pandas.read_csv(csv_file, header=[0, 1, 2], index_col=0)
    assert list(table.columns.names) == ["scorer", "bodyparts", "coords"] and len(table) == FRAMES
    assert list(dict.fromkeys(table.columns.get_level_values(1))) == POSE_KEYPOINTS
    assert set(table.columns.get_level_values(2)) == {"x", "y", "likelihood"}
    frames = json.loads(out)["frames"]
    first = frames[0]["instances"][0]["keypoints"][0]
    assert table.iloc[0][("visionlora", "snout", "x")] == pytest.approx(first["x"])
    pandas.testing.assert_frame_equal(pandas.read_hdf(h5_file, "df_with_missing"), table, check_exact=False)
    capture, facts = open_video(drawn)
    capture.release()
    assert facts.frames == FRAMES and facts.fps == pytest.approx(10)
    assert "(h264, 10 fps)" in err


def test_detector_gives_one_pose_instance_per_box(runs, tmp_path, capsys):
    csv_file = tmp_path / "multi.csv"
    code, out, err = _predict([runs["pose"], runs["video"], "--every", "10", "--detector", runs["detection"],
                               "--detector-threshold", "0.0", "--csv", csv_file], capsys)
    assert code == 0, err
    frames = json.loads(out)["frames"]
    finder = box_finder(load_run(runs["pose"]), {"detector": str(runs["detection"]), "detector_threshold": 0.0})
    capture, facts = open_video(runs["video"])
    for frame in frames:
        capture.set(cv2.CAP_PROP_POS_FRAMES, frame["frame"])
        image = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)
        found = finder.options([Image.fromarray(image)])
        boxes, scores = found["boxes"][0], found["box_scores"][0]
        assert len(frame["instances"]) == len(boxes)
        for instance, box, score in zip(frame["instances"], boxes, scores):
            assert instance["box"] == pytest.approx(box, abs=0.01)
            # the detector's score (what a tracker ranks by), from a batch of frames here and of one there
            assert instance["score"] == pytest.approx(score, abs=1e-4)
    capture.release()
    assert max(len(f["instances"]) for f in frames) > 1
    table = pandas.read_csv(csv_file, header=[0, 1, 2, 3], index_col=0)
    assert table.columns.names[1] == "individuals" and table.columns.get_level_values(1)[0] == "individual1"


def test_bad_video_inputs_are_one_line(runs, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01 not a video" * 100)
    empty = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32))
    writer.release()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"frame.png": [[0, 0, 10, 10]]}))
    cases = [
        ([runs["pose"], broken], f"{broken}: cannot read this video"),
        ([runs["pose"], runs["video"], "--detector", runs["detection"], "--boxes", boxes],
         "give either 'boxes' or a model finding them, not both"),
        ([runs["pose"], empty], f"{empty}: "),
        ([runs["pose"], runs["video"], "--detector", runs["classification"]],
         "is a classification model, not a detection model"),
        ([runs["classification"], runs["video"], "--csv", tmp_path / "x.csv"], "--csv is a pose option"),
        ([runs["classification"], runs["video"], "--detector", runs["detection"]], "--detector is a pose option"),
        ([runs["pose"], runs["video"], "--every", "0"], "--every must be 1 or more"),
    ]
    for args, message in cases:
        code, out, err = _predict(args, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob(".*"))  # no half-written outputs


def test_a_merged_export_or_a_hub_detector_finds_the_boxes(runs, tmp_path, capsys):
    """--detector takes a merged export, and a hub id loaded through the Hugging Face cache."""
    import os
    import subprocess
    import sys

    from tests.conftest import fill_hub_cache
    from visionlora.deploy.export import export_run
    from visionlora.tasks.detection.builtin import tiny_rtdetr

    frame = next((runs["root"] / "pose-data" / "labeled-data").rglob("*.png"))
    merged = tmp_path / "merged-detector"
    export_run(runs["detection"], merged, "merged")
    code, out, err = _predict([runs["pose"], frame, "--detector", merged, "--detector-threshold", "0.0",
                               "--max-instances", "3"], capsys)
    assert code == 0, err
    assert len(json.loads(out)[0]["instances"]) == 3

    home = tmp_path / "hf_home"
    # one class, so that the random detector's best boxes are all "animal" whatever its weights
    fill_hub_cache(home, "acme/box-detector", *tiny_rtdetr(["animal"], 64))
    completed = subprocess.run(
        [sys.executable, "-m", "visionlora", "predict", str(runs["pose"]), str(frame),
         "--detector", "acme/box-detector", "--detector-threshold", "0.0",
         "--detector-label", "animal", "--max-instances", "2"],
        capture_output=True, text=True, env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert len(json.loads(completed.stdout)[0]["instances"]) == 2


needs_trackers = pytest.mark.skipif(not importlib.util.find_spec("trackers"),
                                    reason="--track needs Roboflow's trackers (pip install 'visionlora[track]')")


@needs_trackers
def test_tracked_detection_video_has_ids_mot_text_and_a_drawn_video(runs, tmp_path, capsys):
    mot, output, drawn = tmp_path / "tracks.txt", tmp_path / "out.json", tmp_path / "drawn.mp4"
    code, _, err = _predict([runs["detection"], runs["video"], "--threshold", "0.0", "--track", "--track-buffer", "10",
                             "--mot", mot, "--output", output, "--save-video", drawn], capsys)
    assert code == 0, err
    answer = json.loads(output.read_text())
    assert answer["tracking"]["method"] == "bytetrack" and answer["tracking"]["track_buffer"] == 10
    boxes = [(f["frame"], b) for f in answer["frames"] for b in f["boxes"]]
    assert boxes and all("track_id" in box for _, box in boxes)
    named = {(frame + 1, box["track_id"]) for frame, box in boxes if box["track_id"] is not None}
    assert len(named) > FRAMES  # several tracks, held over frames
    rows = [line.split(",") for line in mot.read_text().splitlines()]
    assert all(len(row) == 10 and row[7:] == ["-1", "-1", "-1"] for row in rows)
    assert {(int(row[0]), int(row[1])) for row in rows} == named
    first = next(box for frame, box in boxes if box["track_id"] is not None)
    row = next(r for r in rows if int(r[1]) == first["track_id"])
    x0, y0, x1, y1 = first["box"]
    assert [float(v) for v in row[2:6]] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
    capture, facts = open_video(drawn)
    capture.release()
    assert facts.frames == FRAMES


@needs_trackers
def test_tracked_pose_names_deeplabcut_individuals_by_track(runs, tmp_path, capsys):
    csv_file, h5_file = tmp_path / "tracked.csv", tmp_path / "tracked.h5"
    code, out, err = _predict([runs["pose"], runs["video"], "--detector", runs["detection"], "--detector-threshold",
                               "0.0", "--max-instances", "4", "--track", "--max-individuals", "3",
                               "--csv", csv_file, "--h5", h5_file], capsys)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["tracking"]["max_individuals"] == 3 and answer["tracking"]["identities"] <= 3
    table = pandas.read_csv(csv_file, header=[0, 1, 2, 3], index_col=0)
    assert list(table.columns.names) == ["scorer", "individuals", "bodyparts", "coords"] and len(table) == FRAMES
    individuals = list(dict.fromkeys(table.columns.get_level_values(1)))
    assert individuals == [f"individual{n}" for n in range(1, answer["tracking"]["identities"] + 1)]
    checked = 0
    for row, frame in zip(table.index, answer["frames"]):
        for instance in frame["instances"]:
            if instance["track_id"] is not None:
                snout = instance["keypoints"][0]
                assert table.loc[row, ("visionlora", f"individual{instance['track_id']}", "snout", "x")] == \
                    pytest.approx(snout["x"])
                checked += 1
        missing = set(individuals) - {f"individual{i['track_id']}" for i in frame["instances"]}
        assert all(table.loc[row, ("visionlora", name)].isna().all() for name in missing)
    assert checked > FRAMES
    pandas.testing.assert_frame_equal(pandas.read_hdf(h5_file, "df_with_missing"), table, check_exact=False)


@needs_trackers
def test_a_stream_url_is_tracked_up_to_end_and_without_end_refused(runs, tmp_path, capsys):
    """What OpenCV opens as a stream (here a file:// URL; a camera's index or rtsp:// alike) runs to --end."""
    stream, output = f"file://{runs['video']}", tmp_path / "stream.json"
    code, _, err = _predict([runs["detection"], stream, "--threshold", "0.0", "--track", "--end", "0.95",
                             "--output", output], capsys)
    assert code == 0, err
    answer = json.loads(output.read_text())
    assert answer["video"] == stream and [f["frame"] for f in answer["frames"]] == list(range(10))
    assert any(box["track_id"] is not None for f in answer["frames"] for box in f["boxes"])
    code, _, err = _predict([runs["detection"], stream, "--track"], capsys)
    assert code == 2 and err.strip() == f"error: {stream}: a camera or stream needs --end SECONDS (how much of it " \
        "to predict)"


def test_tracking_flags_refuse_what_they_cannot_do(runs, tmp_path, capsys):
    frame = next((runs["root"] / "pose-data" / "labeled-data").rglob("*.png"))
    cases = [
        ([runs["detection"], runs["video"], "--mot", tmp_path / "x.txt"], "--mot writes tracks: add --track"),
        ([runs["detection"], runs["video"], "--max-individuals", "2"], "--max-individuals names tracks"),
        ([runs["detection"], frame, "--track"], "--track needs a video"),
        ([runs["detection"], runs["video"], "--track", "--track-thresh", "2"], "--track-thresh must be between"),
        ([runs["detection"], runs["video"], "--track", "--max-individuals", "0"], "--max-individuals must be 1"),
        ([runs["detection"], runs["video"], "--track", "--engine", "ray"], "--track is for videos, which --engine ray"),
    ]
    if importlib.util.find_spec("trackers"):
        cases.append(([runs["classification"], runs["video"], "--track"], "--track follows boxes"))
    for args, message in cases:
        code, _, err = _predict(args, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "x.txt").exists()
