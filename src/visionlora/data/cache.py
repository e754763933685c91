"""Where decoded images live between epochs: in RAM, in a reusable on-disk cache, or nowhere.

- ``ram``: every prepared image is kept in memory (fastest; memory grows with the data).
- ``disk``: each prepared image is one file under the cache folder, keyed by the source
  file's path, size and modification time plus the preparation's settings; a later run
  reuses it. Entries are written to a temporary name and renamed, carry a checksum, and a
  stale, truncated or damaged entry is decoded again, never read as wrong pixels. Reads are
  plain file reads, so resident memory stays flat in the dataset's size.
- ``none``: images are decoded when a batch needs them (in the data-loader workers).
- ``auto``: ``ram`` when the estimated size fits a quarter of the available memory, else ``disk``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, overload

import numpy as np
import torch

from visionlora.artifacts import atomic_write_bytes

RAM_SHARE = 0.25  # of the available memory, for --cache auto
FORMAT_VERSION = 1


@dataclass
class CacheReport:
    """What the summary says of the cache."""

    mode: str
    location: str | None = None
    bytes: int = 0
    decode_seconds: float = 0.0
    reused: int = 0  # entries found in the on-disk cache
    decoded: int = 0  # images decoded in this run
    reason: str = ""

    def merge(self, other: CacheReport) -> None:
        self.bytes += other.bytes
        self.decode_seconds += other.decode_seconds
        self.reused += other.reused
        self.decoded += other.decoded


@dataclass
class CachePlan:
    """How a run stores its prepared images: the mode and, for ``disk``, the folder."""

    mode: str = "ram"
    folder: Path | None = None
    report: CacheReport = field(default_factory=lambda: CacheReport("ram"))


def default_cache_dir() -> Path:
    """``$VISIONLORA_CACHE``, else ``$XDG_CACHE_HOME/visionlora``, else ``~/.cache/visionlora``."""
    if os.environ.get("VISIONLORA_CACHE"):
        return Path(os.environ["VISIONLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionlora"


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or the physical total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_cache(requested: str, folder: str | None, images: int, bytes_per_image: int) -> CachePlan:
    """The cache to use for ``images`` prepared images of about ``bytes_per_image`` each."""
    folder_path = Path(folder) if folder else default_cache_dir()
    estimate = images * bytes_per_image
    if requested == "auto":
        budget = int(available_memory() * RAM_SHARE)
        if estimate <= budget:
            return CachePlan("ram", None, CacheReport("ram", reason=f"auto: about {estimate / 1e6:.0f} MB fits in RAM"))
        reason = (f"auto: about {estimate / 1e9:.1f} GB of decoded images is over a quarter of the available "
                  f"memory ({budget / 1e9:.1f} GB), so they are cached on disk in {folder_path}")
        return CachePlan("disk", folder_path, CacheReport("disk", str(folder_path), reason=reason))
    return CachePlan(requested, folder_path if requested == "disk" else None,
                     CacheReport(requested, str(folder_path) if requested == "disk" else None, reason="--cache"))


def source_key(source: Any, settings: str) -> str | None:
    """A key for a prepared image: the file's path, size and modification time plus ``settings``
    (a Hugging Face dataset row: the dataset's fingerprint, split and index); None if unknown."""
    path = getattr(source, "image", source)
    fingerprint = getattr(getattr(source, "dataset", None), "_fingerprint", None)
    if fingerprint is not None:
        text = f"hf|{fingerprint}|{source.split}|{source.index}|{settings}|{FORMAT_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()
    if not isinstance(path, (str, Path)):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    text = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{settings}|{FORMAT_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


class StoredImages(Sequence[Any]):
    """Prepared images in one of the cache modes; ``meta(i)`` is item ``i`` without its large
    arrays (None in their place), known without reading pixels, for building datasets."""

    def __init__(self, metas: list[Any]):
        self.metas = metas

    def __len__(self) -> int:
        return len(self.metas)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.item(i) for i in range(len(self))[index]]
        return self.item(index)

    def item(self, index: int) -> Any:
        """Prepared image ``index``."""
        raise NotImplementedError

    def meta(self, index: int) -> Any:
        return self.metas[index]


class RamImages(StoredImages):
    """Every prepared image in memory (``--cache ram``)."""

    def __init__(self, items: list[Any]):
        super().__init__(items)

    def item(self, index: int) -> Any:
        return self.metas[index]


class LazyImages(StoredImages):
    """Prepared images produced again whenever asked for (``--cache none``)."""

    def __init__(self, metas: list[Any], sources: Sequence[Any], prepare: Callable[[Any], Any]):
        super().__init__(metas)
        self.sources, self.prepare = list(sources), prepare

    def item(self, index: int) -> Any:
        return self.prepare(self.sources[index])


class DiskImages(StoredImages):
    """Prepared images read from their cache entries (one file each) on every access; an entry
    found damaged is prepared from its source again and rewritten."""

    def __init__(self, metas: list[Any], paths: Sequence[Path], sources: Sequence[Any], prepare: Callable[[Any], Any]):
        super().__init__(metas)
        self.paths, self.sources, self.prepare = list(paths), list(sources), prepare

    def item(self, index: int) -> Any:
        item = read_entry(self.paths[index])
        if item is None:
            item = self.prepare(self.sources[index])
            write_entry(self.paths[index], item)
        return item


# -- entries: arrays in a safetensors file, structure and checksum in its metadata -------------
def entry_path(folder: Path, key: str) -> Path:
    return Path(folder) / key[:2] / f"{key}.safetensors"


def write_skip(path: Path, reason: str) -> None:
    """Remember that the source of ``path`` is not a readable image (and why)."""
    atomic_write_bytes(path.with_suffix(".skip"), reason.encode(), durable=False)


def read_skip(path: Path) -> str | None:
    try:
        return path.with_suffix(".skip").read_text()
    except OSError:
        return None



def write_entry(path: Path, item: Any) -> int:
    """Write ``item`` atomically to ``path``; returns its size in bytes."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    structure = _encode(item, arrays)
    checksum = 0
    for name in sorted(arrays):
        checksum = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), checksum)
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={"structure": json.dumps(structure), "crc32": str(checksum), "version": str(FORMAT_VERSION)})
    atomic_write_bytes(path, data, durable=False)  # an entry lost in a crash is decoded again
    return len(data)


MISSING = object()  # what read_meta returns for an entry that is absent or unreadable


def read_meta(path: Path) -> Any:
    """An entry's item without its large arrays, from the file's header alone (MISSING if unreadable)."""
    try:
        with path.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(header_length)).get("__metadata__", {})
        if metadata.get("version") != str(FORMAT_VERSION):
            return MISSING
        return _decode(json.loads(metadata["structure"]), None)
    except Exception:  # any unreadable header means the entry is rebuilt
        return MISSING


def read_entry(path: Path) -> Any | None:
    """The item in a cache entry, or None when it is missing, truncated, damaged or of another version."""
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
        arrays = load(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        if metadata.get("version") != str(FORMAT_VERSION):
            return None
        checksum = 0
        for name in sorted(arrays):
            checksum = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), checksum)
        if str(checksum) != metadata.get("crc32"):
            return None
        return _decode(json.loads(metadata["structure"]), arrays)
    except Exception:  # any unreadable entry is rebuilt
        return None


SMALL_ARRAY = 256  # elements: arrays this small (keypoints, matrices) stay in the structure


def entry_meta(item: Any) -> Any:
    """``item`` with its large arrays replaced by None (what ``StoredImages.meta`` returns)."""
    return _decode(_encode(item, {}), None)


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        kind = "__tensor__" if isinstance(value, torch.Tensor) else "__array__"
        if array.size <= SMALL_ARRAY:
            return {kind: None, "values": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
        arrays[str(len(arrays))] = array
        return {kind: str(len(arrays) - 1)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), arrays) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_encode(v, arrays) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        return {"__dict__": {k: _encode(v, arrays) for k, v in value.items()}}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _decode(value: Any, arrays: dict[str, np.ndarray] | None) -> Any:
    """The item ``_encode`` described; with ``arrays`` None, its large arrays are None."""
    if not isinstance(value, dict):
        return value
    for kind in ("__tensor__", "__array__"):
        if kind in value:
            if "values" in value:
                array = np.asarray(value["values"], dtype=value["dtype"]).reshape(value["shape"])
            elif arrays is None:
                return None
            else:
                array = arrays[value[kind]].copy()
            return torch.from_numpy(array) if kind == "__tensor__" else array
    if "__dataclass__" in value:
        module, _, name = value["__dataclass__"].partition(":")
        if not module.startswith("visionlora."):
            raise ValueError(f"cache entry names a foreign type {module}")
        kind = getattr(importlib.import_module(module), name)
        return kind(**{k: _decode(v, arrays) for k, v in value["fields"].items()})
    if "__list__" in value:
        items = [_decode(v, arrays) for v in value["__list__"]]
        return tuple(items) if value.get("tuple") else items
    return {k: _decode(v, arrays) for k, v in value["__dict__"].items()}
