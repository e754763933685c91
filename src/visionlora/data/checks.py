"""What ``visionlora check`` finds in a dataset without a model: the finding record, and the checks
every task shares (unreadable files, exact and near-duplicate images within and across parts, EXIF
rotation, image sizes against the model's input, class balance per part).

A task adds its own sanity checks of a record's labels (``TaskData.check_record``); the command that
reads the parts, runs all of it and writes the report is :mod:`visionlora.checking`.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionlora.data.images import load_rgb

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)
HASH_BITS = 16  # the perceptual hash is HASH_BITS x HASH_BITS bits (256: random photos-alike differ by 36 or more)
NEAR_DUPLICATE_BITS = 16  # hashes at most this far apart are the same picture (a resized, recompressed copy: 2-6)
HASH_SIDE = 64  # a JPEG is decoded at about this size (PIL's draft) to hash it
SMALL_SHARE = 0.5  # an image whose shorter side is under this share of the model's input is upscaled a lot
WIDE_ASPECT = 2.0  # an image more than this many times wider than high (or higher than wide) is squashed
IMBALANCE = 5.0  # a part whose largest class is over this many times its smallest is reported
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class Finding:
    """One problem: how bad (``error``, ``warning``, ``info``), what kind, the file and part it is in,
    a one-line message, the other files it involves (a duplicate's copies) and, for a label error,
    the given and predicted labels shaped like predictions."""

    severity: str
    kind: str
    file: str
    message: str
    split: str = ""
    others: list[str] = field(default_factory=list)
    score: float | None = None
    given: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None

    def line(self) -> str:
        """The terminal's line for it: severity, file, message."""
        where = f"{self.file}: " if self.file else ""
        return f"{self.severity}: {where}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, [])}


@dataclass
class ImageFacts:
    """What one look at an image file gives: its stored size, EXIF orientation, a content digest and a
    perceptual hash (HASH_BITS squared bits, packed), or why it cannot be read."""

    name: str
    split: str
    width: int = 0
    height: int = 0
    orientation: int = 1
    digest: str = ""
    phash: bytes | None = None
    error: str | None = None

    @property
    def shown_size(self) -> tuple[int, int]:
        """(width, height) as decoded, EXIF orientation applied."""
        turned = self.orientation in ROTATING_ORIENTATIONS
        return (self.height, self.width) if turned else (self.width, self.height)


def inspect_image(source: Any, name: str, split: str) -> ImageFacts:
    """Read ``source`` (a path, or what ``load_rgb`` opens) once: size, orientation, digest and hash."""
    facts = ImageFacts(name, split)
    try:
        if isinstance(source, (str, Path)):
            data = Path(source).read_bytes()
            facts.digest = hashlib.sha1(data).hexdigest()
            with Image.open(io.BytesIO(data)) as opened:
                _inspect_opened(opened, facts)
        else:
            image = load_rgb(source)
            facts.digest = hashlib.sha1(image.tobytes()).hexdigest()
            _inspect_opened(image, facts)
    except FileNotFoundError:
        facts.error = "file not found"
    except (UnidentifiedImageError, Image.DecompressionBombError):
        facts.error = "not a readable image (unknown format, empty or too large)"
    except (OSError, SyntaxError, ValueError) as err:
        facts.error = f"cannot decode: {err}"
    except Exception as err:  # a lazy dataset row may raise anything; name it instead
        facts.error = f"cannot open: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return facts


def _inspect_opened(opened: Image.Image, facts: ImageFacts) -> None:
    """Fill ``facts`` from an opened image, decoding a JPEG at about HASH_SIDE pixels (its draft mode)."""
    import imagehash

    facts.width, facts.height = opened.size
    facts.orientation = int(opened.getexif().get(0x0112, 1) or 1)
    if opened.format == "JPEG":
        opened.draft("RGB", (HASH_SIDE, HASH_SIDE))
    opened.load()
    bits = imagehash.phash(ImageOps.exif_transpose(opened).convert("L"), hash_size=HASH_BITS).hash
    facts.phash = np.packbits(bits.ravel()).tobytes()


def thumbnail_png(source: Any, side: int = 96) -> bytes | None:
    """A small PNG of an image as decoded (EXIF applied), or None when it cannot be read."""
    try:
        image = load_rgb(source)
    except Exception:  # an unreadable file has no thumbnail; the finding says why
        return None
    buffer = io.BytesIO()
    fit_side(image, side).save(buffer, format="PNG")
    return buffer.getvalue()


def fit_side(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled so that its longer side is ``side`` (small images enlarged by whole pixels)."""
    scale = side / max(image.size)
    if scale >= 2:
        factor = int(scale)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# -- the shared checks ---------------------------------------------------------------------------------
def unreadable(images: Sequence[ImageFacts]) -> list[Finding]:
    return [Finding(ERROR, "unreadable", f.name, f"cannot be read: {f.error}", f.split)
            for f in images if f.error]


def rotated(images: Sequence[ImageFacts]) -> list[Finding]:
    """Images whose EXIF orientation turns or flips them: shown (and trained) as turned, while tools that
    ignore EXIF, and labels drawn on the stored pixels, see them otherwise."""
    found = []
    for facts in images:
        if not facts.error and facts.orientation != 1:
            width, height = facts.shown_size
            found.append(Finding(WARNING, "exif-rotation", facts.name, f"EXIF orientation {facts.orientation}: stored "
                                 f"{facts.width}x{facts.height}, used as {width}x{height} (turned as its EXIF "
                                 "says); check that its labels were drawn on the turned image", facts.split))
    return found


def duplicates(images: Sequence[ImageFacts], near_bits: int = NEAR_DUPLICATE_BITS) -> list[Finding]:
    """Groups of identical files, and of images whose perceptual hashes are at most ``near_bits`` apart.

    A group across parts (training and validation or test) is a leak, an error; within a part, a warning.
    """
    readable = [f for f in images if not f.error and f.phash is not None]
    groups = _groups(readable, near_bits)
    found = []
    for members in groups:
        first, rest = members[0], members[1:]
        exact = len({readable[i].digest for i in members}) == 1
        splits = sorted({readable[i].split for i in members})
        kind = "identical" if exact else "near-duplicate"
        others = [readable[i].name for i in rest]
        if len(splits) > 1:
            message = (f"{kind} image in {' and '.join(splits)} (leak between parts): "
                       f"{', '.join(f'{readable[i].name} ({readable[i].split})' for i in rest)}")
            found.append(Finding(ERROR, "leak", readable[first].name, message, readable[first].split, others))
        else:
            found.append(Finding(WARNING, "duplicate", readable[first].name,
                                 f"{kind} image in {splits[0]}: {', '.join(others)}", splits[0], others))
    return found


def _groups(images: Sequence[ImageFacts], near_bits: int) -> list[list[int]]:
    """Indices of images joined by equal digests or near hashes, groups of two or more, in file order."""
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[str, int] = {}
    for index, facts in enumerate(images):
        if facts.digest in first_of:
            parent[root(index)] = root(first_of[facts.digest])
        first_of.setdefault(facts.digest, index)
    for a, b in near_pairs([f.phash or b"" for f in images], near_bits):
        parent[root(int(b))] = root(int(a))
    members: dict[int, list[int]] = {}
    for index in range(len(images)):
        members.setdefault(root(index), []).append(index)
    return [group for group in members.values() if len(group) > 1]


def near_pairs(hashes: Sequence[bytes], near_bits: int, block: int = 1024) -> Iterable[tuple[int, int]]:
    """(i, j), i < j, of the packed hashes (of equal length) at most ``near_bits`` bits apart (Hamming distance
    by one matrix product of their bits, a block of rows at a time)."""
    if len(hashes) < 2:
        return []
    packed = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), -1)
    bits = np.unpackbits(packed, axis=1).astype(np.float32)
    ones = bits.sum(axis=1)
    pairs = []
    for start in range(0, len(bits), block):
        rows = bits[start:start + block]
        distance = ones[start:start + block, None] + ones[None, :] - 2 * rows @ bits.T
        i, j = np.nonzero(distance <= near_bits + 0.5)
        keep = start + i < j
        pairs += list(zip((start + i[keep]).tolist(), j[keep].tolist()))
    return pairs


def sizes(images: Sequence[ImageFacts], input_size: int, keeps_aspect: bool) -> list[Finding]:
    """Images much smaller than the model's input (upscaled), and, for a model that squares its input,
    images far from square (squashed)."""
    found = []
    for facts in images:
        if facts.error:
            continue
        width, height = facts.shown_size
        if min(width, height) < SMALL_SHARE * input_size:
            found.append(Finding(WARNING, "small", facts.name, f"{width}x{height} is upscaled "
                                 f"{input_size / min(width, height):.1f}x to the model's {input_size} px input",
                                 facts.split))
        aspect = max(width, height) / max(1, min(width, height))
        if not keeps_aspect and aspect > WIDE_ASPECT:
            found.append(Finding(WARNING, "aspect", facts.name, f"{width}x{height} (aspect {aspect:.1f}:1) is "
                                 f"squashed to the model's square {input_size}x{input_size} input", facts.split))
    return found


def size_summary(images: Sequence[ImageFacts]) -> dict[str, Any]:
    """Smallest, median and largest width and height, and the aspect ratios' spread, of the readable images."""
    shown = np.array([f.shown_size for f in images if not f.error], dtype=np.float64).reshape(-1, 2)
    if not len(shown):
        return {}
    aspect = shown[:, 0] / np.maximum(shown[:, 1], 1)
    return {"images": int(len(shown)),
            "width": {"min": int(shown[:, 0].min()), "median": float(np.median(shown[:, 0])),
                      "max": int(shown[:, 0].max())},
            "height": {"min": int(shown[:, 1].min()), "median": float(np.median(shown[:, 1])),
                       "max": int(shown[:, 1].max())},
            "aspect": {"min": round(float(aspect.min()), 3), "median": round(float(np.median(aspect)), 3),
                       "max": round(float(aspect.max()), 3)}}


def class_balance(counts: dict[str, Counter], labels: Sequence[str]) -> list[Finding]:
    """Per part: classes of the label list with no example, and a largest class over IMBALANCE times
    the smallest present."""
    found = []
    for split, counter in counts.items():
        if not counter:
            continue
        missing = [name for name in labels if not counter.get(name)]
        if missing:
            found.append(Finding(WARNING, "class-balance", "", f"{split}: no examples of {', '.join(missing)}", split))
        present = {name: n for name, n in counter.items() if n}
        largest, smallest = max(present, key=present.__getitem__), min(present, key=present.__getitem__)
        if present[largest] > IMBALANCE * present[smallest]:
            found.append(Finding(WARNING, "class-balance", "", f"{split}: class imbalance, {largest!r} has "
                                 f"{present[largest]} examples and {smallest!r} {present[smallest]} "
                                 f"({present[largest] / present[smallest]:.1f}x)", split))
    return found


def reading_findings(entries: Iterable[dict[str, str]], severity: str, kind: str, split: str) -> list[Finding]:
    """What a reader left out (``Part.skipped`` or ``Part.dropped`` entries) as findings."""
    return [Finding(severity, kind, entry.get("file") or entry.get("annotation", ""), entry.get("reason", ""), split)
            for entry in entries]
