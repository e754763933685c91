"""Bounded fuzzing of every annotation reader: only the project's own clear errors may escape.

Short by default; for a longer run: VISIONLORA_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_readers.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import read_data
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task

DETECTION = get_task("detection")
EXAMPLES = int(os.environ.get("VISIONLORA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(["a.png", "b.png", "../x.png", "/etc/passwd", ""]))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
maybe = lambda strategy: st.one_of(strategy, values)  # noqa: E731

coco_image = st.fixed_dictionaries({"id": maybe(st.integers(0, 3)),
                                    "file_name": maybe(st.sampled_from(["a.png", "b.png", "missing.png"]))},
                                   optional={"width": values, "height": values})
coco_annotation = st.fixed_dictionaries(
    {"image_id": maybe(st.integers(0, 3)), "category_id": maybe(st.integers(0, 3))},
    optional={"id": values, "bbox": maybe(st.lists(st.floats(-50, 200), min_size=3, max_size=5)), "iscrowd": values,
              "keypoints": maybe(st.lists(st.one_of(st.floats(-10, 100), st.integers(0, 2)), max_size=14)),
              "area": values},
)
coco_category = st.fixed_dictionaries({"id": maybe(st.integers(0, 3)), "name": maybe(st.text(max_size=5))},
                                      optional={"keypoints": maybe(st.lists(st.text(max_size=4), max_size=4)),
                                                "skeleton": maybe(st.lists(st.lists(st.integers(-1, 5), max_size=3),
                                                                           max_size=3))})
coco_document = st.one_of(
    st.fixed_dictionaries({"images": maybe(st.lists(coco_image, max_size=4)),
                           "annotations": maybe(st.lists(coco_annotation, max_size=5)),
                           "categories": maybe(st.lists(coco_category, max_size=3))}),
    values,
)


def _folder_with_images() -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 24)).save(Path(tmp.name) / name)
    return tmp


def _only_clear_errors(read) -> None:
    try:
        read()
    except VisionLoraError as err:
        assert str(err) and "\n" not in str(err)


@FUZZ
@given(document=coco_document, raw=st.booleans(), text=st.text(max_size=40))
def test_coco_reader(document, raw, text):
    with _folder_with_images() as tmp:
        path = Path(tmp) / "annotations.json"
        path.write_text(text if raw else json.dumps(document, allow_nan=True))
        _only_clear_errors(lambda: DETECTION.data.read_part(path))
        _only_clear_errors(lambda: read_data("pose", str(path), None, 0, None))


voc_object = st.builds(
    lambda name, box: f"<object><name>{name}</name><bndbox>" + "".join(
        f"<{tag}>{value}</{tag}>" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox></object>",
    st.text(alphabet="abc <&>", max_size=4),
    st.lists(st.one_of(st.floats(-10, 100), st.text(max_size=3)), min_size=0, max_size=4),
)


@FUZZ
@given(filename=st.sampled_from(["a.png", "b.png", "nope.png", "../a.png", ""]),
       objects=st.lists(voc_object, max_size=3),
       size=st.lists(st.text(alphabet="0123456789-x.", max_size=4), min_size=2, max_size=2), garbage=st.booleans())
def test_voc_reader(filename, objects, size, garbage):
    with _folder_with_images() as tmp:
        (Path(tmp) / "annotations").mkdir()
        xml = (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
               f"<height>{size[1]}</height></size>{''.join(objects)}</annotation>")
        (Path(tmp) / "annotations" / "a.xml").write_text(xml[: len(xml) // 2] if garbage else xml)
        _only_clear_errors(lambda: DETECTION.data.read_part(Path(tmp)))


@FUZZ
@given(lines=st.lists(st.lists(st.one_of(st.integers(-2, 4), st.floats(-1, 2), st.text(alphabet="ab.-e", max_size=3)),
                               max_size=7), max_size=4),
       names=st.one_of(st.text(max_size=20), st.just("names: [a, b]\n"), st.just("names: {0: a}\n")),
       names_file=st.sampled_from(["classes.txt", "data.yaml", "obj.names"]), stem=st.sampled_from(["a", "b", "zzz"]))
def test_yolo_reader(lines, names, names_file, stem):
    with _folder_with_images() as tmp:
        root = Path(tmp)
        (root / "labels").mkdir()
        (root / names_file).write_text(names)
        (root / "labels" / f"{stem}.txt").write_text("\n".join(" ".join(map(str, line)) for line in lines))
        _only_clear_errors(lambda: DETECTION.data.read_part(root))


@FUZZ
@given(bodyparts=st.one_of(st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3), values),
       header=st.lists(st.lists(st.text(alphabet="scorerbodypartsxy,", max_size=8), max_size=5), max_size=3),
       rows=st.lists(st.lists(st.one_of(st.text(alphabet="0123456789.-nan", max_size=5),
                                        st.sampled_from(["labeled-data/v/a.png", "a.png", "../../x.png", ""])),
                               max_size=6), max_size=4),
       fraction=values)
def test_deeplabcut_reader(bodyparts, header, rows, fraction):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        frames = root / "labeled-data" / "v"
        frames.mkdir(parents=True)
        Image.new("RGB", (32, 24)).save(frames / "a.png")
        (root / "config.yaml").write_text(yaml.safe_dump({"bodyparts": bodyparts, "TrainingFraction": fraction}))
        table = [["scorer", "me", "me"], ["bodyparts", "a", "a"], ["coords", "x", "y"]] if not header else header
        (frames / "CollectedData_me.csv").write_text("\n".join(",".join(map(str, r)) for r in table + rows))
        _only_clear_errors(lambda: read_data("pose", str(root), None, 0, None))


@FUZZ
@given(names=st.lists(st.text(min_size=1, max_size=12).filter(lambda n: "/" not in n and "\x00" not in n
                                                                        and n not in (".", "..")),
                      min_size=1, max_size=4, unique=True),
       contents=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_imagefolder_reader_and_image_decoding(names, contents):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        for index, name in enumerate(names):
            try:
                folder = root / name
                folder.mkdir(exist_ok=True)
                (folder / f"{name[:5]}_{index}.jpg").write_bytes(contents[index % len(contents)])
            except OSError:
                continue  # a name the file system refuses is not a reader input
        _only_clear_errors(lambda: read_data("classification", str(root), None, 0, 0.2))
        for path in root.rglob("*.jpg"):
            try:
                load_rgb(path)
            except UnreadableImage:
                pass
