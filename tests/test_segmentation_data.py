"""Reading semantic segmentation data (VOC, mask folders, Hugging Face, COCO), its bad inputs, and its metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionlora.data.coco_masks import CocoMask
from visionlora.data.formats import SEGMENTATION_FORMAT_NAMES, read_part, read_source
from visionlora.data.images import load_rgb
from visionlora.data.masks import load_mask, voc_palette
from visionlora.data.voc_segmentation import VOC_CLASSES
from visionlora.errors import VisionLoraError
from visionlora.metrics.segmentation import confusion_matrix, per_class_rows, segmentation_metrics

W, H = 16, 12
PALETTE = [v for colour in voc_palette() for v in colour]


def _image(path: Path, seed: int = 0, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _mask_array(seed: int, num_classes: int, border: bool = True, size=(W, H)) -> np.ndarray:
    array = np.random.default_rng(seed).integers(0, num_classes, (size[1], size[0])).astype(np.uint8)
    if border:
        array[0, :] = 255
    return array


def _palette_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode="P")
    image.putpalette(PALETTE)
    image.save(path)
    return path


def _grey_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path)
    return path


def _read(folder: Path):
    return read_part(SEGMENTATION_FORMAT_NAMES, folder)


# -- Pascal VOC ---------------------------------------------------------------------------------
def _voc(root: Path, stems=("a", "b", "c"), unmasked=("d",)) -> dict[str, np.ndarray]:
    masks = {}
    for index, stem in enumerate(stems):
        _image(root / "JPEGImages" / f"{stem}.jpg", index)
        masks[stem] = _mask_array(index, len(VOC_CLASSES))
        _palette_png(root / "SegmentationClass" / f"{stem}.png", masks[stem])
    for stem in unmasked:
        _image(root / "JPEGImages" / f"{stem}.jpg", 99)
    return masks


def test_voc_folder_reads_the_images_with_a_mask(tmp_path):
    masks = _voc(tmp_path / "voc")
    part = _read(tmp_path / "voc")
    assert part.format == "voc-segmentation" and part.labels == list(VOC_CLASSES) and part.own_val is None
    assert [Path(r.image).name for r in part.records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert part.extra["ignore_index"] == 255 and part.extra["palette"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert "1 images in JPEGImages/ have no mask" in part.extra["notes"][0]
    for record in part.records:
        loaded = load_mask(record, len(part.labels), image_size=load_rgb(record.image).size)
        assert loaded.dtype == np.uint8 and np.array_equal(loaded, masks[Path(record.image).stem])


def test_voc_image_sets_give_train_and_its_own_validation(tmp_path):
    root = tmp_path / "voc"
    _voc(root, stems=("a", "b", "c", "d", "e"), unmasked=())
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nc\ne\n")
    (lists / "val.txt").write_text("b\nd\n")
    (lists / "test.txt").write_text("f\n")  # VOC's test images have no masks: not read
    source, _ = read_source(SEGMENTATION_FORMAT_NAMES, str(root), None, seed=0, val_fraction=0.25)
    assert [Path(r.image).stem for r in source.train] == ["a", "c", "e"]
    assert [Path(r.image).stem for r in source.val] == ["b", "d"]
    assert source.description["val"].endswith("(val.txt)")


def test_voc_labelmap_names_classes_and_maps_colour_masks(tmp_path):
    """CVAT/Datumaro exports: labelmap.txt names the classes, RGB masks use its colours; palette masks their ids."""
    root = tmp_path / "voc"
    _image(root / "JPEGImages" / "rgb.jpg")
    _image(root / "JPEGImages" / "indexed.jpg")
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:10,20,30::\n"
                                       "tree:0,200,0::\n")
    ids = np.array([[0, 1, 2, 255]] * 3, dtype=np.uint8).repeat(4, axis=1)  # 3 x 16
    colours = np.array([(0, 0, 0), (10, 20, 30), (0, 200, 0), (224, 224, 192)], dtype=np.uint8)
    (root / "SegmentationClass").mkdir()
    Image.fromarray(colours[np.minimum(ids, 3)]).save(root / "SegmentationClass" / "rgb.png")
    _palette_png(root / "SegmentationClass" / "indexed.png", ids)
    part = _read(root)
    assert part.labels == ["background", "road", "tree"]
    assert part.extra["palette"] == [[0, 0, 0], [10, 20, 30], [0, 200, 0]]
    for record in part.records:
        assert np.array_equal(load_mask(record, 3), ids), record.mask


# -- images/ and masks/ folders ------------------------------------------------------------------
def _mask_folders(root: Path, count: int, classes=("background", "road", "car"), class_list: bool = True,
                  seed: int = 0) -> dict[str, np.ndarray]:
    masks = {}
    for index in range(count):
        stem = f"img_{seed + index:03d}"
        _image(root / "images" / f"{stem}.jpg", seed + index)
        masks[stem] = _mask_array(seed + index, len(classes))
        _grey_png(root / "masks" / f"{stem}.png", masks[stem])
    if class_list:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return masks


def test_mask_folders_match_masks_by_name(tmp_path):
    masks = _mask_folders(tmp_path / "d", 3)
    _image(tmp_path / "d" / "images" / "nested" / "deep.png", 7)
    masks["nested/deep"] = _mask_array(7, 3)
    _grey_png(tmp_path / "d" / "masks" / "nested" / "deep.png", masks["nested/deep"])
    part = _read(tmp_path / "d")
    assert part.format == "mask-folders" and part.labels == ["background", "road", "car"]
    assert len(part.records) == 4
    for record in part.records:
        stem = Path(record.image).relative_to(tmp_path / "d" / "images").with_suffix("").as_posix()
        assert np.array_equal(load_mask(record, 3, image_size=(W, H)), masks[stem])


def test_mask_folders_read_id2label_json(tmp_path):
    _mask_folders(tmp_path / "d", 2, class_list=False)
    (tmp_path / "d" / "id2label.json").write_text(json.dumps({"1": "road", "0": "background", "2": "car"}))
    assert _read(tmp_path / "d").labels == ["background", "road", "car"]


def test_train_and_val_folders_share_one_class_list(tmp_path):
    root = tmp_path / "d"
    _mask_folders(root / "train", 4, class_list=False)
    _mask_folders(root / "val", 2, class_list=False, seed=10)
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    source, held_out = read_source(SEGMENTATION_FORMAT_NAMES, str(root), None, seed=0, val_fraction=0.25)
    assert len(source.train) == 4 and len(source.val) == 2
    assert source.labels == held_out[0].labels == ["background", "road", "car"]
    assert source.extra["ignore_index"] == 255
    assert all("/val/" in r.image for r in source.val)


def test_a_flat_folder_is_split_by_seed(tmp_path):
    _mask_folders(tmp_path / "d", 8)

    def val_images(seed):
        source, _ = read_source(SEGMENTATION_FORMAT_NAMES, str(tmp_path / "d"), None, seed=seed, val_fraction=0.25)
        assert len(source.train) == 6 and len(source.val) == 2
        assert not {r.image for r in source.train} & {r.image for r in source.val}
        return [r.image for r in source.val]

    assert val_images(0) == val_images(0)
    assert val_images(0) != val_images(1)


# -- Hugging Face datasets -----------------------------------------------------------------------
def _hf_dataset(root: Path, id2label: dict | None = None, column: str = "annotation", blank_row: int | None = None,
                description: str = "") -> tuple[Path, dict[str, list[np.ndarray]]]:
    import datasets

    arrays: dict[str, list[np.ndarray]] = {}
    splits = {}
    for split, count, offset in (("train", 4, 0), ("validation", 2, 10)):
        arrays[split] = [_mask_array(offset + i, 3) for i in range(count)]
        images = [Image.open(_image(root.parent / "src" / f"{split}{i}.png", offset + i)) for i in range(count)]
        masks = [Image.fromarray(a, mode="P") for a in arrays[split]]
        if blank_row is not None and split == "train":
            masks[blank_row] = None
        info = datasets.DatasetInfo(description=description)
        splits[split] = datasets.Dataset.from_dict({"image": images, column: masks}, info=info).cast_column(
            column, datasets.Image())
    datasets.DatasetDict(splits).save_to_disk(str(root))
    if id2label is not None:
        (root / "id2label.json").write_text(json.dumps(id2label))
    return root, arrays


def test_saved_hugging_face_dataset(tmp_path):
    root, arrays = _hf_dataset(tmp_path / "hf", {"0": "background", "1": "road", "2": "car"})
    source, _ = read_source(SEGMENTATION_FORMAT_NAMES, str(root), None, seed=0, val_fraction=0.25)
    assert source.labels == ["background", "road", "car"] and source.description["format"] == "huggingface-segmentation"
    assert len(source.train) == 4 and len(source.val) == 2
    for records, split in ((source.train, "train"), (source.val, "validation")):
        for index, record in enumerate(records):
            image = load_rgb(record.image)
            assert image.size == (W, H)
            assert np.array_equal(load_mask(record, 3, image_size=image.size), arrays[split][index])


def test_hugging_face_classes_from_the_description_and_any_annotation_name(tmp_path):
    description = json.dumps({"id2label": {"0": "sky", "1": "sea", "2": "sand"}})
    root, arrays = _hf_dataset(tmp_path / "hf", column="semantic_map", description=description)
    part = _read(root)
    assert part.labels == ["sky", "sea", "sand"]
    assert np.array_equal(load_mask(part.records[1], 3), arrays["train"][1])


# -- COCO polygons and RLE ---------------------------------------------------------------------------
def _box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, starting with background)."""
    flat = mask.T.flatten()
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def _coco(root: Path, annotations: list[dict], name: str = "_annotations.coco.json") -> Path:
    for i in (1, 2, 3):
        _image(root / f"im{i}.jpg", i)
    coco = {"images": [{"id": i, "file_name": f"im{i}.jpg", "width": W, "height": H} for i in (1, 2, 3)],
            "categories": [{"id": 0, "name": "shapes", "supercategory": "none"},  # Roboflow's dataset name
                           {"id": 5, "name": "disc", "supercategory": "shapes"},
                           {"id": 2, "name": "square", "supercategory": "shapes"}],
            "annotations": annotations}
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(coco))
    return root


def test_coco_polygons_rle_and_crowds_are_drawn(tmp_path):
    from pycocotools import mask as coco_mask

    square = np.zeros((H, W), dtype=np.uint8)
    square[2:6, 3:9] = 1  # rows 2-5, columns 3-8
    crowd = np.zeros((H, W), dtype=np.uint8, order="F")
    crowd[8:12, 0:4] = 1
    compressed = coco_mask.encode(np.asfortranarray(crowd))["counts"].decode()
    root = _coco(tmp_path / "c", [
        # small square (category 2) listed before the large disc it lies on: drawn last all the same
        {"id": 10, "image_id": 1, "category_id": 2, "segmentation": _box(4, 4, 6, 6), "area": 4, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 5, "segmentation": _box(1, 1, 12, 10), "area": 99, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": _rle_counts(square)}},
        {"id": 13, "image_id": 2, "category_id": 5, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": compressed}},
    ])
    part = _read(root)
    assert part.format == "coco-segmentation" and part.labels == ["background", "square", "disc"]
    assert "supercategory of all the others" in part.extra["notes"][0]
    first, second, third = (load_mask(r, 3, image_size=(W, H)) for r in part.records)
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[1:10, 1:12] = 2  # polygons cover [x0, x1) x [y0, y1)
    expected[4:6, 4:6] = 1
    assert np.array_equal(first, expected)
    expected = square.copy()
    expected[crowd.astype(bool)] = 255
    assert np.array_equal(second, expected)
    assert np.array_equal(third, np.zeros((H, W), dtype=np.uint8))
    assert isinstance(part.records[0].mask, CocoMask) and part.records[2].mask.shapes == ()


def test_coco_file_under_annotations_folder(tmp_path):
    root = _coco(tmp_path / "c", [{"id": 1, "image_id": 3, "category_id": 5, "segmentation": _box(0, 0, 2, 2)}],
                 name="annotations/instances_train.json")
    part = _read(root)
    assert part.where.endswith("instances_train.json") and len(part.records) == 3
    assert load_mask(part.records[2], 3)[:2, :2].tolist() == [[2, 2], [2, 2]]


# -- bad inputs: one clear line naming the file and the problem ------------------------------------
def _load_all(folder: Path, num_classes: int = 3, image_size=None):
    def run():
        part = _read(folder)
        for record in part.records:
            load_mask(record, num_classes, image_size=image_size or load_rgb(record.image).size)
    return run


def mask_size_differs(tmp):
    _mask_folders(tmp / "d", 2)
    mask = _grey_png(tmp / "d" / "masks" / "img_001.png", np.zeros((8, 10), dtype=np.uint8))
    return _load_all(tmp / "d"), [str(mask), "mask is 10x8 pixels but its image",
                                  str(tmp / "d" / "images" / "img_001.jpg"), "is 16x12"]


def class_id_out_of_range(tmp):
    _mask_folders(tmp / "d", 2)
    array = _mask_array(1, 3)
    array[3, 3], array[4, 4] = 7, 9
    mask = _grey_png(tmp / "d" / "masks" / "img_001.png", array)
    return _load_all(tmp / "d"), [str(mask), "class ids 7, 9 outside the 3 classes (ids 0-2, 255 = ignore)"]


def missing_mask(tmp):
    _mask_folders(tmp / "d", 2)
    (tmp / "d" / "masks" / "img_001.png").unlink()
    return _load_all(tmp / "d"), [str(tmp / "d" / "images" / "img_001.jpg"), "no mask (looked for",
                                  str(tmp / "d" / "masks" / "img_001.png")]


def mask_saved_as_jpeg(tmp):
    _mask_folders(tmp / "d", 2)
    (tmp / "d" / "masks" / "img_001.png").rename(tmp / "d" / "masks" / "img_001.jpg")
    return _load_all(tmp / "d"), ["img_001.jpg: no mask", "found img_001.jpg, but masks must be .png"]


def mask_deleted_after_reading(tmp):
    _mask_folders(tmp / "d", 2)
    part = _read(tmp / "d")
    Path(part.records[0].mask).unlink()
    return lambda: load_mask(part.records[0], 3), [part.records[0].mask, "mask file not found"]


def unreadable_mask(tmp):
    _mask_folders(tmp / "d", 2)
    (tmp / "d" / "masks" / "img_000.png").write_text("not a png")
    return _load_all(tmp / "d"), [str(tmp / "d" / "masks" / "img_000.png"), "not a readable mask image"]


def rgb_mask(tmp):
    _mask_folders(tmp / "d", 2)
    Image.new("RGB", (W, H), (10, 20, 30)).save(tmp / "d" / "masks" / "img_000.png")
    return _load_all(tmp / "d"), [str(tmp / "d" / "masks" / "img_000.png"),
                                  "an RGB colour mask, not a palette or single-channel image"]


def colour_not_in_labelmap(tmp):
    _voc(tmp / "voc", stems=("a",), unmasked=())
    Image.new("RGB", (W, H), (1, 2, 3)).save(tmp / "voc" / "SegmentationClass" / "a.png")
    return _load_all(tmp / "voc", 21), [str(tmp / "voc" / "SegmentationClass" / "a.png"),
                                        "colours (1,2,3) are not in the class colour table"]


def voc_list_names_image_without_mask(tmp):
    _voc(tmp / "voc", stems=("a", "b"), unmasked=("c",))
    lists = tmp / "voc" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nc\n")
    return _load_all(tmp / "voc", 21), [str(tmp / "voc" / "JPEGImages" / "c.jpg"), "no mask (looked for",
                                        str(tmp / "voc" / "SegmentationClass" / "c.png")]


def voc_list_names_missing_image(tmp):
    _voc(tmp / "voc", stems=("a",), unmasked=())
    lists = tmp / "voc" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nzebra\n")
    return _load_all(tmp / "voc", 21), [str(lists / "train.txt"), "image 'zebra' not found in"]


def no_class_list(tmp):
    _mask_folders(tmp / "d", 2, class_list=False)
    return _load_all(tmp / "d"), [str(tmp / "d"), "no class list; add classes.txt", "id2label.json"]


def id2label_with_a_gap(tmp):
    _mask_folders(tmp / "d", 2, class_list=False)
    (tmp / "d" / "id2label.json").write_text(json.dumps({"0": "background", "2": "car"}))
    return _load_all(tmp / "d"), [str(tmp / "d" / "id2label.json"), "class ids must run 0 to 1; missing 1"]


def hf_without_class_names(tmp):
    root, _ = _hf_dataset(tmp / "hf")
    return _load_all(root), [str(root), "no class names; add an id2label.json"]


def hf_row_without_mask(tmp):
    root, _ = _hf_dataset(tmp / "hf", {"0": "a", "1": "b", "2": "c"}, blank_row=2)
    return _load_all(root), [f"{root} (train[2]): no annotation in column 'annotation'"]


def hf_mask_size_differs(tmp):
    root, _ = _hf_dataset(tmp / "hf", {"0": "a", "1": "b", "2": "c"})
    return _load_all(root, image_size=(W + 1, H)), [f"{root} (train[0]): mask is 16x12 pixels", "is 17x12"]


def _coco_row(segmentation, iscrowd=0):
    def build(tmp):
        ann = {"id": 77, "image_id": 1, "category_id": 5, "segmentation": segmentation, "iscrowd": iscrowd}
        root = _coco(tmp / "c", [ann], name="annotations.json")
        return _load_all(root), [f"{root / 'annotations.json'}: annotation 77"]
    return build


def coco_image_size_differs(tmp):
    root = _coco(tmp / "c", [], name="annotations.json")
    _image(root / "im2.jpg", size=(H, W))  # stored rotated
    return _load_all(root), [f"{root / 'annotations.json'}: image id 2: the COCO file gives the image as 16x12",
                             str(root / "im2.jpg"), "is 12x16"]


BAD_INPUTS = {
    "mask size differs": (mask_size_differs, None),
    "class id out of range": (class_id_out_of_range, None),
    "missing mask": (missing_mask, None),
    "mask saved as jpeg": (mask_saved_as_jpeg, None),
    "mask deleted after reading": (mask_deleted_after_reading, None),
    "unreadable mask": (unreadable_mask, None),
    "rgb mask": (rgb_mask, None),
    "colour not in labelmap": (colour_not_in_labelmap, None),
    "voc list: image without mask": (voc_list_names_image_without_mask, None),
    "voc list: missing image": (voc_list_names_missing_image, None),
    "no class list": (no_class_list, None),
    "id2label with a gap": (id2label_with_a_gap, None),
    "hf: no class names": (hf_without_class_names, None),
    "hf: row without mask": (hf_row_without_mask, None),
    "hf: mask size differs": (hf_mask_size_differs, None),
    "coco: image size differs": (coco_image_size_differs, None),
    "coco: polygon of 4 numbers": (_coco_row([[1, 1, 5, 5]]), "polygon 1 has 4 numbers"),
    "coco: polygon of text": (_coco_row([[1, 1, "x", 5, 5, 5]]), "polygon 1 must be a list of numbers"),
    "coco: segmentation a string": (_coco_row("oops"), "'segmentation' must be a list of polygons or an RLE dict"),
    "coco: no segmentation": (_coco_row(None), "has no 'segmentation'"),
    "coco: RLE size differs": (_coco_row({"size": [H, W + 1], "counts": [H * (W + 1)]}, 1),
                               "RLE size [12, 17] (height, width) differs from the image's [12, 16]"),
    "coco: RLE counts short": (_coco_row({"size": [H, W], "counts": [5, 3]}), "RLE 'counts' cover 8 pixels"),
    "coco: RLE bad string": (_coco_row({"size": [H, W], "counts": "\x7f\x7f"}), "not a valid compressed RLE"),
    "coco: polygon far out": (_coco_row([[1, 1, 5e9, 1, 5, 5]]), "far outside any image"),
}


@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(tmp_path, row):
    build, problem = BAD_INPUTS[row]
    action, expected = build(tmp_path)
    expected = expected + ([problem] if problem else [])
    with pytest.raises(VisionLoraError) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# -- metric ------------------------------------------------------------------------------------------
TARGET = np.array([[0, 0, 1], [1, 1, 2], [2, 255, 2]])
PREDICTED = np.array([[0, 1, 1], [1, 2, 2], [2, 0, 0]])
NAMES = ["background", "road", "car", "tree"]  # tree is in neither: no IoU, left out of the means


def test_metrics_of_a_small_example_by_hand():
    confusion = confusion_matrix(PREDICTED, TARGET, 4)
    assert confusion.dtype == np.int64
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    metrics = segmentation_metrics(confusion, NAMES)
    # IoU = TP / (TP + FP + FN): background 1/3, road 2/4, car 2/4
    assert metrics["per_class_iou"] == pytest.approx({"background": 1 / 3, "road": 0.5, "car": 0.5, "tree": None})
    assert metrics["mean_iou"] == pytest.approx(4 / 9, abs=1e-15)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 8, abs=1e-15)  # 5 of the 8 pixels not ignored
    assert metrics["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3, abs=1e-15)
    rows = per_class_rows(confusion, NAMES)
    assert rows[1] == {"class": "road", "iou": 0.5, "accuracy": 0.666667, "pixels": 3, "predicted_pixels": 3}
    assert rows[3] == {"class": "tree", "iou": None, "accuracy": None, "pixels": 0, "predicted_pixels": 0}


def test_confusion_matrices_add_up_and_take_tensors():
    second_target, second_predicted = np.array([[3, 255], [0, 0]]), np.array([[3, 3], [0, 1]])
    summed = confusion_matrix(PREDICTED, TARGET, 4) + confusion_matrix(torch.tensor(second_predicted),
                                                                      torch.tensor(second_target), 4)
    together = confusion_matrix(np.concatenate([PREDICTED.ravel(), second_predicted.ravel()]),
                                np.concatenate([TARGET.ravel(), second_target.ravel()]), 4)
    assert np.array_equal(summed, together) and summed.sum() == 11 and summed[3, 3] == 1
    with pytest.raises(ValueError, match="predicted class ids must be 0 to 3"):
        confusion_matrix(np.array([4]), np.array([0]), 4)


def _evaluate_mean_iou(results, gt_seg_maps, num_labels, ignore_index):
    """The ``evaluate`` library's ``mean_iou`` (total_intersect_and_union, then nanmeans), as it is published."""
    total_intersect = np.zeros((num_labels,), dtype=np.float64)
    total_union = np.zeros((num_labels,), dtype=np.float64)
    total_pred = np.zeros((num_labels,), dtype=np.float64)
    total_label = np.zeros((num_labels,), dtype=np.float64)
    for pred_label, label in zip(results, gt_seg_maps):
        mask = np.not_equal(label, ignore_index)
        pred_label, label = pred_label[mask], np.array(label)[mask]
        intersect = pred_label[pred_label == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred_label = np.histogram(pred_label, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_intersect += area_intersect
        total_union += area_pred_label + area_label - area_intersect
        total_pred += area_pred_label
        total_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_intersect / total_union
        acc = total_intersect / total_label
    return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": total_intersect.sum() / total_label.sum(), "per_category_iou": iou}


def test_metrics_match_the_evaluate_librarys_mean_iou():
    rng = np.random.default_rng(0)
    num_labels = 6  # class 5 never occurs; class 4 is only ever predicted
    predictions, targets = [], []
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for size in [(7, 9), (12, 5), (16, 16), (3, 4)]:
        target = rng.integers(0, 4, size)
        target[rng.random(size) < 0.15] = 255
        predicted = np.where(rng.random(size) < 0.6, np.minimum(target, 4), rng.integers(0, 5, size))
        predictions.append(predicted)
        targets.append(target)
        confusion += confusion_matrix(predicted, target, num_labels)
    expected = _evaluate_mean_iou(predictions, targets, num_labels, 255)
    metrics = segmentation_metrics(confusion, [f"c{i}" for i in range(num_labels)])
    assert abs(metrics["mean_iou"] - expected["mean_iou"]) < 1e-12
    assert abs(metrics["mean_accuracy"] - expected["mean_accuracy"]) < 1e-12
    assert abs(metrics["pixel_accuracy"] - expected["overall_accuracy"]) < 1e-12
    for index, iou in enumerate(expected["per_category_iou"]):
        ours = metrics["per_class_iou"][f"c{index}"]
        assert (ours is None) if np.isnan(iou) else abs(ours - iou) < 1e-12
    assert metrics["per_class_iou"]["c5"] is None and metrics["per_class_iou"]["c4"] == 0.0
