"""Resolve image paths named by annotation files, refusing ones that escape the dataset."""

from __future__ import annotations

from pathlib import Path

from visionlora.errors import VisionLoraError


def resolve_image(root: Path, name: str, where: str, search: tuple[str, ...] = ("", "images")) -> Path:
    """The file ``name`` relative to ``root`` (or ``root/images``), which must exist and stay inside ``root``.

    ``where`` names the annotation (file and record) for the error message.
    """
    root = root.resolve()
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(root):
            raise VisionLoraError(f"{where}: image path {name!r} points outside the dataset folder {root}")
        candidates = [candidate]
    else:
        candidates = [root / sub / relative for sub in search] + [root / sub / relative.name for sub in search]
    for candidate in candidates:
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(root):
                raise VisionLoraError(f"{where}: image {name!r} is a link to outside the dataset folder {root}")
            return candidate
    raise VisionLoraError(f"{where}: image {name!r} not found "
                          f"(looked in {root}{' and ' + str(root / 'images') if 'images' in search else ''})")
