"""Where each sample of a stream epoch goes and what training consumed: the pure, checkpointed half of
datamodules/stream.py (its module docstring, steps 2-4 and "Resume", describes the layout).

`slot_size`, `buffer_order` and `grouped_order` are pure functions of the sample count, seed, epoch and
slot, so every (rank, worker) computes its own order without talking to the others; `StreamPos`
tags every yielded sample; `StreamProgress` is what a checkpoint stores to resume mid-epoch.
Checked against torch.utils.data (DistributedSampler's padding semantics) in tests/datamodules/test_stream.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch.distributed as dist


class StreamPos(NamedTuple):
    epoch: int  # stream epoch the sample belongs to
    slot: int  # rank * num_workers + worker id
    index: int  # items of the slot's order walked, this one included
    yielded: int  # samples the slot yielded, this one included (== index unless images were skipped)


def slot_size(num_samples: int, num_slots: int, slot: int, equalize: str) -> int:
    """Samples slot `slot` yields per epoch (see the module docstring, step 3)."""
    if equalize == "pad":
        return math.ceil(num_samples / num_slots)
    if equalize == "drop":
        return num_samples // num_slots
    return len(range(slot, num_samples, num_slots))


def buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of `buffer_size` emits items 0..n-1 in: fill, then emit a random one."""
    out, buf = [], []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer_size:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return np.asarray(out, dtype=np.int64)


def grouped_order(lengths: np.ndarray, window: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(lengths)) that keeps every item inside its window of `window` items,
    sorts each window by length and shuffles the window's batches (see the module docstring, step 4)."""
    out = []
    for start in range(0, len(lengths), window):
        part = start + np.argsort(lengths[start:start + window], kind="stable")
        full = len(part) // batch_size  # a short last batch stays last: later batches stay aligned
        batches = [part[i * batch_size:(i + 1) * batch_size] for i in range(full)]
        out.extend(batches[j] for j in rng.permutation(full))
        out.append(part[full * batch_size:])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class StreamProgress:
    """What the training loop consumed of the current stream epoch; the object checkpoints store.

    `consumed[slot] = (index, yielded)` of the slot's last consumed sample. When every slot of this
    rank has yielded its full count the epoch is complete and the next `iter()` starts epoch + 1.
    """

    def __init__(self):
        self.epoch = 0
        self.consumed: dict[int, tuple[int, int]] = {}
        self.num_slots: int | None = None  # S of the stream that produced `consumed`
        self._sizes: dict[int, int] = {}  # this rank's slots -> samples per epoch, set by bind()

    def bind(self, num_slots: int, sizes: dict[int, int]) -> None:
        if self.consumed and self.num_slots not in (None, num_slots):
            raise ValueError(
                f"resuming a stream saved with {self.num_slots} (rank, worker) slots on {num_slots} slots: "
                "use the same world_size and num_workers as the run that wrote the checkpoint"
            )
        self.num_slots, self._sizes = num_slots, dict(sizes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, {}

    def resume_point(self, slot: int) -> tuple[int, int]:
        return self.consumed.get(slot, (0, 0))

    def consume(self, positions: Sequence[StreamPos]) -> None:
        """Marks a batch as trained on. Call once per batch, in the order the loader delivered them."""
        for p in positions:
            epoch, slot, index, yielded = (int(v) for v in p)
            if epoch != self.epoch:
                raise RuntimeError(f"consumed a sample of stream epoch {epoch} while at epoch {self.epoch}")
            if yielded > self.resume_point(slot)[1]:
                self.consumed[slot] = (index, yielded)
        if self._sizes and all(self.resume_point(s)[1] >= n for s, n in self._sizes.items()):
            self.set_epoch(self.epoch + 1)

    def state_dict(self, *, gather_ranks: bool = False) -> dict:
        """Plain ints and lists. `gather_ranks=True` merges every rank's slots (a collective: call it
        on all ranks, as Lightning's checkpointing does) so rank 0's checkpoint holds them all."""
        consumed = dict(self.consumed)
        if gather_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.epoch, consumed))
            if len({e for e, _ in parts}) != 1:
                raise RuntimeError(f"ranks disagree on the stream epoch: {[e for e, _ in parts]}")
            consumed = {s: kv for _, c in parts for s, kv in c.items()}
        return {
            "epoch": self.epoch,
            "num_slots": self.num_slots,
            "consumed": [[s, k, y] for s, (k, y) in sorted(consumed.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = {int(s): (int(k), int(y)) for s, k, y in state["consumed"]}
        saved_slots = state["num_slots"]
        if self._sizes and saved_slots is not None and self.consumed and saved_slots != self.num_slots:
            raise ValueError(
                f"checkpoint stream state has {saved_slots} (rank, worker) slots, this stream has "
                f"{self.num_slots}: resume with the same world_size and num_workers"
            )
        self.num_slots = saved_slots if saved_slots is not None else self.num_slots
