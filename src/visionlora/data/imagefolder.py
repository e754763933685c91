"""ImageFolder: ``<class>/<image>`` folders -> labelled images."""

from __future__ import annotations

from pathlib import Path

from visionlora.data.images import is_image_file
from visionlora.data.records import DataFormat, LabelledImage, Part
from visionlora.errors import VisionLoraError


def read_class_folders(root: Path) -> Part:
    """Read ``root/<class>/<image>``; an empty class folder or no class at all is an error."""
    if not root.is_dir():
        raise VisionLoraError(f"{root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise VisionLoraError(f"{root}: no class folders found (expected {root}/<class>/<image>)")
    records, skipped = [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        skipped += [{"file": str(p), "reason": "not an image file extension"} for p in files if not is_image_file(p)]
        if not images:
            raise VisionLoraError(f"{class_dir}: class folder '{class_dir.name}' holds no images")
        records += [LabelledImage(str(p), class_dir.name) for p in images]
    labels = sorted({r.label for r in records})
    return Part(records, labels, "imagefolder", str(root), skipped=skipped)


FORMAT = DataFormat(
    name="imagefolder",
    expected="an ImageFolder (<class>/<image> folders)",
    finds=lambda path: path.is_dir(),
    read=read_class_folders,
)
