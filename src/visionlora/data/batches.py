"""Batches made in data-loader worker processes, handed to the main process cheaply.

PyTorch's DataLoader moves each batch a worker makes into freshly allocated shared memory,
and every tensor of it into a segment of its own. Touching fresh pages costs about as much
as the augmentation of the images in them, and a detection batch's per-image targets are
dozens of tiny segments. Here, instead:

- each worker stacks a batch's large fields into buffers of its own that live in shared
  memory and are reused: a few slots per worker, each claimed for one batch;
- the main process maps each buffer's file descriptor, received once and kept, again for
  every batch (no socket round trip per tensor), and hands the slot back when the last view
  of what it received dies (a finalizer on the storage), so nothing it still reads is overwritten;
- small tensors travel by value, inside the pickled batch;
- when every slot of a worker is still held, the batch takes PyTorch's usual way.

Tasks stack their fields with :func:`stacked` (or take a buffer with :func:`batch_buffer`);
outside a worker that uses a pool, both are plain ``torch.stack`` and ``torch.zeros``.
"""

from __future__ import annotations

import itertools
import os
import weakref
from multiprocessing.reduction import DupFd
from typing import Any, Callable

import numpy as np
import torch

from visionlora.compat import shared_memory_fd, storage_from_shared_fd

SMALL_BYTES = 64 * 1024  # tensors up to this size are pickled by value

_pools: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()  # main: key -> claims
_descriptors: dict[tuple[str, int, int], int] = {}  # main: (pool, worker pid, buffer id) -> its file descriptor
_live: dict[tuple, int] = {}  # main: a batch's claim -> how many of its pooled tensors are still in use
_claiming: SlotClaim | None = None  # in a worker, while a pooled collate runs


def stacked(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    """``torch.stack(tensors)``; in a pooled worker, into the claimed slot's buffer ``name``."""
    first = tensors[0]
    out = None
    if _claiming is not None and first.nbytes * len(tensors) > SMALL_BYTES:
        out = _claiming.buffer(name, (len(tensors), *first.shape), first.dtype)
    return torch.stack(tensors, out=out)


def batch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape``; in a pooled worker, the claimed slot's buffer ``name``, zeroed."""
    if _claiming is None or int(np.prod(shape)) * dtype.itemsize <= SMALL_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return _claiming.buffer(name, shape, dtype).zero_()


class PooledCollate:
    """A collate function whose batches, made in workers, reach the main process through reused buffers.

    ``slots`` per worker bounds the batches a worker has in flight or held by the main process
    (its prefetch plus those the training loop holds); more fall back to PyTorch's sharing.
    """

    def __init__(self, collate: Callable[[list[Any]], Any], workers: int, slots: int):
        self.collate, self.slots = collate, slots
        self.key = f"{os.getpid()}-{id(self)}"
        self.claims = torch.zeros(max(workers, 1), slots, dtype=torch.int64).share_memory_()
        _pools[self.key] = self.claims
        weakref.finalize(self, _close_descriptors, self.key)
        self._worker: _WorkerBuffers | None = None

    def __call__(self, items: list[Any]) -> Any:
        global _claiming
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.collate(items)
        if self._worker is None:  # this worker's first batch: its row is its own now (a restarted worker's too)
            self._worker = _WorkerBuffers(self.claims[info.id].numpy(), self.slots)
        claim = self._worker.claim()
        _claiming = claim
        try:
            batch = self.collate(items)
        except BaseException:
            if claim is not None:
                self._worker.claims[claim.slot] = 0
            raise
        finally:
            _claiming = None
        if claim is not None and not claim.used:  # all of it small: nothing to hand back later
            self._worker.claims[claim.slot] = 0
        return _for_sending(batch, claim, _Sender(self.key, info.id, self._worker))


class _WorkerBuffers:
    """One worker's slots: the buffers of each (with an id each, never reused), its row of the
    shared claim tokens, and which buffers the main process has the descriptor of."""

    def __init__(self, claims: np.ndarray, slots: int):
        self.claims = claims  # token of the batch holding each slot, 0 when free
        self.claims[:] = 0
        self.buffers: list[dict[str, tuple[torch.Tensor, int]]] = [{} for _ in range(slots)]
        self.ids = itertools.count()
        self.sent: set[int] = set()  # ids of the buffers whose file descriptor the main process holds
        self.retired: list[int] = []  # ids of replaced buffers whose descriptor the main process should close
        self.tokens = itertools.count((os.getpid() & 0xFFFFF) << 32 | 1)

    def claim(self) -> SlotClaim | None:
        for slot, token in enumerate(self.claims):
            if token == 0:
                self.claims[slot] = next(self.tokens)
                return SlotClaim(slot, int(self.claims[slot]), self)
        return None


class SlotClaim:
    """A slot claimed for one batch; its buffers are made (in shared memory) on first use and kept."""

    def __init__(self, slot: int, token: int, worker: _WorkerBuffers):
        self.slot, self.token, self.worker = slot, token, worker
        self.used: dict[int, int] = {}  # data pointer -> id of each buffer this batch was stacked into

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffers = self.worker.buffers[self.slot]
        kept, number = buffers.get(name, (None, -1))
        numel = int(np.prod(shape))
        if kept is None or kept.dtype != dtype or kept.numel() < numel:
            if kept is not None and number in self.worker.sent:
                self.worker.retired.append(number)
            kept, number = torch.empty(numel, dtype=dtype).share_memory_(), next(self.worker.ids)
            buffers[name] = (kept, number)
        self.used[kept.untyped_storage().data_ptr()] = number
        return kept[:numel].view(shape)


class _Sender:
    """Where a worker's batch goes: its pool, the worker and its buffers' bookkeeping."""

    def __init__(self, pool: str, worker: int, buffers: _WorkerBuffers):
        self.pool, self.worker, self.pid, self.buffers = pool, worker, os.getpid(), buffers


class _Leased:
    """A pooled tensor on its way to the main process: where it lies in its buffer, the buffer's
    file descriptor the first time, the descriptors to close, and the claim to hand back when done."""

    def __init__(self, tensor: torch.Tensor, sender: _Sender, claim: SlotClaim):
        storage = tensor.untyped_storage()
        number = claim.used[storage.data_ptr()]
        fd, self.nbytes = shared_memory_fd(storage)
        self.descriptor = None if number in sender.buffers.sent else DupFd(fd)
        sender.buffers.sent.add(number)
        self.retired = [(sender.pool, sender.pid, old) for old in sender.buffers.retired]
        sender.buffers.sent.difference_update(sender.buffers.retired)
        sender.buffers.retired.clear()
        self.buffer_key = (sender.pool, sender.pid, number)
        self.layout = (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        self.claim = (sender.pool, sender.worker, claim.slot, claim.token)

    def __reduce__(self):
        return _receive_leased, (self.descriptor, self.retired, self.buffer_key, self.nbytes, self.layout,
                                 self.claim)


class _ByValue:
    """A small tensor pickled with its bytes, not through a shared-memory segment of its own."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return torch.from_numpy, (self.tensor.numpy(),)


def _for_sending(value: Any, claim: SlotClaim | None, sender: _Sender) -> Any:
    """The batch with pooled tensors leased and small ones by value (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        if claim is not None and value.untyped_storage().data_ptr() in claim.used:
            return _Leased(value, sender, claim)
        if value.nbytes <= SMALL_BYTES and value.dtype != torch.bfloat16:
            return _ByValue(value)
        return value
    if isinstance(value, dict):
        return {k: _for_sending(v, claim, sender) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_for_sending(v, claim, sender) for v in value)
    return value


def _receive_leased(descriptor, retired, buffer_key, nbytes: int, layout, claim) -> torch.Tensor:
    """In the main process: the tensor, mapped from its buffer. Its batch's slot is handed back once
    the storages of all the batch's pooled tensors are no longer used."""
    for old in retired:  # buffers the worker replaced by larger ones
        if old in _descriptors:
            os.close(_descriptors.pop(old))
    if descriptor is not None:
        _descriptors[buffer_key] = descriptor.detach()
    dtype, shape, stride, offset = layout
    storage = storage_from_shared_fd(_descriptors[buffer_key], nbytes)
    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
    claims = _pools.get(claim[0])
    if claims is not None:
        _live[claim] = _live.get(claim, 0) + 1  # a batch's tensors are all unpickled before any can die
        weakref.finalize(tensor.untyped_storage(), _release, claims, claim)
    return tensor


def _release(claims: torch.Tensor, claim: tuple) -> None:
    """One more of the claim's tensors is no longer used; the last one hands the slot back."""
    _live[claim] -= 1
    if _live[claim]:
        return
    del _live[claim]
    _, worker, slot, token = claim
    if int(claims[worker, slot]) == token:  # not already taken by a later batch (a restarted worker)
        claims[worker, slot] = 0


def _close_descriptors(pool: str) -> None:
    for key in [key for key in _descriptors if key[0] == pool]:
        os.close(_descriptors.pop(key))
