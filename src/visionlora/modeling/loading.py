"""Load pretrained models and their image processors from the hub or a local folder, safely.

By default only safetensors weights are read and no code from a checkpoint is run; a
caller can allow pickled ``.bin`` weights or remote code for a block of work with
:func:`loading_policy`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from visionlora.errors import VisionLoraError


@dataclass(frozen=True)
class LoadingPolicy:
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: str | None = None  # the hub revision (branch, tag or commit) of hub models loaded in the block


_DEFAULT_POLICY = LoadingPolicy()
# The default is None (B039: no call in a ContextVar default); current_policy() falls back to _DEFAULT_POLICY.
_POLICY: contextvars.ContextVar[LoadingPolicy | None] = contextvars.ContextVar("visionlora_loading", default=None)
PICKLE_HINT = "pickled .bin weights can run code when loaded; pass --allow-pickle only if you trust the source"


@contextlib.contextmanager
def loading_policy(allow_pickle: bool = False, trust_remote_code: bool = False,
                   revision: str | None = None) -> Iterator[LoadingPolicy]:
    """Within the block, allow pickled weights and/or checkpoint code as given, and load hub
    models at ``revision``."""
    policy = LoadingPolicy(allow_pickle, trust_remote_code, revision)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def current_policy() -> LoadingPolicy:
    policy = _POLICY.get()
    return _DEFAULT_POLICY if policy is None else policy


def load_pretrained(auto_class, ref: str, with_processor: bool = True, loading_check=None, **kwargs: Any):
    """``auto_class.from_pretrained(ref)`` and its image processor, under the loading policy.

    A new head size is allowed (``ignore_mismatched_sizes``): the head is re-initialised
    for the dataset's labels and trained. ``loading_check``, if given, sees transformers'
    loading report (missing, unexpected and mismatched keys). Loading problems become
    one-line errors.
    """
    from transformers import AutoImageProcessor

    policy = current_policy()
    check_weight_files(Path(ref))
    pinned: dict[str, Any] = {"revision": policy.revision} if policy.revision and not Path(ref).exists() else {}
    try:
        model = auto_class.from_pretrained(
            ref,
            ignore_mismatched_sizes=True,
            use_safetensors=None if policy.allow_pickle else True,
            trust_remote_code=policy.trust_remote_code,
            output_loading_info=loading_check is not None,
            **pinned,
            **kwargs,
        )
        if loading_check is not None:
            model, report = model
            loading_check(report)
        processor = (
            AutoImageProcessor.from_pretrained(ref, backend="pil", trust_remote_code=policy.trust_remote_code, **pinned)
            if with_processor
            else None
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "folder" if Path(ref).exists() else "hub id (offline, or no such model?)"
        hint = f"; {PICKLE_HINT}" if "safetensors" in first.lower() and not policy.allow_pickle else ""
        raise VisionLoraError(f"{ref}: cannot load model from this {kind}: {first}{hint}") from None
    return model, processor


def check_weight_files(folder: Path) -> None:
    """Refuse a local folder whose weights exist only as pickles, unless the policy allows them."""
    if not folder.is_dir() or current_policy().allow_pickle:
        return
    has_safe = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles and not has_safe:
        raise VisionLoraError(f"{folder}: only pickled weights ({', '.join(pickles)}); {PICKLE_HINT}")


def base_revision(ref: str, revision: str | None = None) -> str | None:
    """What identifies the exact weights behind ``ref``: a local folder's content hash, or the
    hub commit of its cached snapshot (at ``revision``); None when neither can be known."""
    path = Path(ref)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
        return _content_hash(path, tuple((file, *_identity(file)) for file in files))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None


def _identity(file: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced: its inode, size and modification time."""
    stat = file.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _content_hash(folder: Path, files: tuple[tuple[Path, int, int, int], ...]) -> str:
    """The SHA-256 of ``files`` (names and contents), remembered while none is rewritten (``_identity``):
    the jobs of one process that share a base hash it once."""
    import hashlib

    digest = hashlib.sha256()
    for file, *_ in files:
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_base_unchanged(base_ref: str, recorded: str | None, allow_change: bool) -> str | None:
    """The revision to load ``base_ref`` at. A local base whose content changed since training
    is refused (unless ``allow_change``); a hub base is pinned to its recorded commit."""
    if recorded is None:
        return None
    if Path(base_ref).exists():
        current = base_revision(base_ref)
        if current != recorded and not allow_change:
            raise VisionLoraError(
                f"{base_ref}: the base model changed since the adapter was trained "
                f"(content {recorded[:19]}..., now {str(current)[:19]}...); pass --allow-base-change to load it anyway"
            )
        return None
    return None if allow_change or recorded.startswith("sha256:") else recorded
