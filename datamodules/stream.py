"""The streaming dataset: JSONL record shards -> samples, sharded by (rank, worker), resumable mid-epoch.

Checked against torch.utils.data (IterableDataset, get_worker_info, DataLoader worker round-robin)
and lightning/pytorch 2.6 (trainer/connectors/checkpoint_connector.py:
`LightningDataModule.state_dict` is dumped on every rank by `Trainer.save_checkpoint` and
`load_state_dict` is called in `restore_datamodule` before `train_dataloader()`; `_set_sampler_epoch`
never reaches an IterableDataset, hence the epoch lives in `StreamProgress`).

How one epoch is laid out (everything below is a pure function of the index, seed, epoch and slot;
the order functions and `StreamProgress` are in datamodules/stream_order.py):
1. The global sample order: shards in manifest order (permuted by `seed, epoch` when shuffling),
   records in file order, then the `expand(record)` samples of each record in order.
2. Slots: S = world_size * num_workers; slot = rank * num_workers + worker id. Global sample g goes
   to slot g % S. Dealing samples (not shards) works with one shard or many and keeps slot counts
   within one of each other. Each worker reads every shard's lines it needs by seeking, so I/O per
   worker is its own records only.
3. Equalizing (DDP needs every rank to run the same number of batches or it hangs):
   "pad": every slot gets ceil(M/S) samples; the missing ones wrap around to the start of the
   global order (DistributedSampler semantics: at most S-1 repeats per epoch). "drop": every slot
   gets floor(M/S); the last M % S samples of the epoch's order are not seen this epoch (a different
   set each epoch when shuffling). "none": slots differ by at most one sample; fine on one rank.
   With equal slot sizes T every rank yields num_workers * ceil(T / batch_size) batches.
4. Each slot's samples pass through a seeded shuffle buffer (`buffer_size`, seed `seed, epoch, slot`).
   Length grouping (`group_by_length = k > 0`, needs `expand`): the shuffled order is cut into windows
   of k * batch_size samples; each window is sorted by `sample_length` (text characters) and its
   batches are put in a seeded random order (seed `seed, epoch, slot, 1`). A batch then holds samples
   of similar length, so padding to its longest one costs little (the HF Trainer's
   `group_by_length` idea, applied per slot so sharding and resume stay as they are). The DataLoader
   cuts each worker's stream into batches, so windows line up with batches as long as no image is
   skipped; a skip shifts later batches by one sample, which costs only some padding.
5. Images are decoded after the buffer, only for yielded samples. Under policy "skip" an unreadable
   image is counted and logged as it is found (a slot's 1st, 2nd, 4th, 8th, ...; the total when the
   stream closes, at its end or when training stops), and the slot pads at its end (cycling its own
   order, past the images it found unreadable) so it still yields exactly its T samples: batch counts
   stay equal across ranks. Only a whole pass without one readable image is an error.

Resume: every sample carries `_pos = StreamPos(epoch, slot, index, yielded)`: how far its slot had
walked its order and how many samples it had yielded, including this one. The training loop hands
consumed positions to `StreamProgress.consume`; its state_dict goes into the checkpoint; on resume
each worker restarts its slot right after the last consumed sample. The DataLoader delivers each
worker's batches in order, so "last consumed" per slot is a single (index, yielded) pair.

Lightning wiring (in a LightningDataModule; the LightningModule must not also override the hook):

    self.progress = StreamProgress()                                    # in __init__
    def train_dataloader(self):                                         # built after DDP init
        return StreamDataset(..., num_workers=2, progress=self.progress).loader(batch_size=8)
    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.progress.consume(batch["_pos"])
        return batch
    def state_dict(self): return self.progress.state_dict(gather_ranks=True)
    def load_state_dict(self, state): self.progress.load_state_dict(state)

Workers must not be persistent: each `iter()` ships the current progress to fresh workers.
A Lightning epoch cut short (limit_train_batches) continues the same stream epoch next time.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from expvl.datamodules.images import ImageError, load_transformed, resolve_image
from expvl.datamodules.sources import (
    RecordReader,
    ShardIndex,
    SkipLog,
    build_index,
    check_policy,
    discover_shards,
)
from expvl.datamodules.stream_order import StreamPos, StreamProgress, buffer_order, grouped_order, slot_size
from expvl.vocab.records import Record

log = logging.getLogger(__name__)
EQUALIZE = ("pad", "drop", "none")


@dataclass
class StreamConfig:
    shuffle: bool = True  # permute shard order per epoch and pass each slot through a shuffle buffer
    buffer_size: int = 1024  # shuffle buffer length in samples; 1 keeps the dealt order
    seed: int = 0  # with the epoch and slot, fixes every order; same seed + epoch = same samples
    equalize: str = "pad"  # "pad" | "drop" | "none": how slots get equal sample counts (see docstring)
    policy: str = "error"  # "error" | "skip" for malformed records and unreadable images
    group_by_length: int = 0  # k > 0: batches of similar text length, sorted within windows of k batches

    def __post_init__(self):
        check_policy(self.policy)
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 (0 = off), got {self.group_by_length}")
        if self.equalize not in EQUALIZE:
            raise ValueError(f"equalize must be one of {EQUALIZE}, got {self.equalize!r}")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")


class StreamDataset(IterableDataset):
    """Yields {"record": Record, "sample": dict | None, "image": Tensor | None, "_pos": StreamPos}.

    Args:
        source: dataset folder / manifest path / list of shard paths (see sources.discover_shards).
        split: manifest split to read (e.g. "train"); None reads every shard.
        config: StreamConfig (shuffle, seed, equalize, policy).
        transform: the encoder's image transform (PIL RGB -> tensor); None skips image decoding.
        expand: record -> list of sample dicts (e.g. one per VQA pair); [] filters the record out.
            Must be deterministic: it is called once while indexing and again when reading.
        rank, world_size: default to torch.distributed's when initialized, else 0 and 1.
        num_workers: the DataLoader's worker count (use `.loader()` to keep them in sync).
        progress: the StreamProgress the training loop updates and checkpoints (a fresh one if None).
        root: image root for a plain shard list (default: each shard's folder).
        cache_images: keep every transformed image in memory after its first decode (per process),
            for many epochs over a small set; the transform must then be deterministic (random
            augmentation goes after the cache: StageDataModule `augment`).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        split: str | None = None,
        config: StreamConfig | None = None,
        transform: Callable | None = None,
        expand: Callable[[Record], list[dict]] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        progress: StreamProgress | None = None,
        root: str | Path | None = None,
        cache_images: bool = False,
    ):
        super().__init__()
        self.config = config or StreamConfig()
        self.transform, self.expand = transform, expand
        self.image_cache: dict[Path, torch.Tensor] | None = {} if cache_images else None
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.num_workers = num_workers
        if self.config.group_by_length and expand is None:
            raise ValueError("stream.group_by_length needs samples to measure: this stream has no expand "
                             "function (set group_by_length: 0 for record-level streams)")
        self.index: ShardIndex = build_index(
            discover_shards(source, split=split, root=root), policy=self.config.policy, expand=expand,
            lengths=self.config.group_by_length > 0,
        )
        self.batch_size: int | None = None  # set by loader(); length grouping cuts windows in batches
        if self.index.num_samples == 0:
            raise ValueError(f"no samples in {[str(s.path) for s in self.index.shards]}")
        self.num_slots = self.world_size * max(num_workers, 1)
        self.progress = progress if progress is not None else StreamProgress()
        self.progress.bind(self.num_slots, {s: self.slot_size(s) for s in self.rank_slots})

    def _image(self, path: Path) -> torch.Tensor:
        if self.image_cache is None:
            return load_transformed(path, self.transform)
        if path not in self.image_cache:
            self.image_cache[path] = load_transformed(path, self.transform)
        return self.image_cache[path]

    @property
    def rank_slots(self) -> list[int]:
        w = max(self.num_workers, 1)
        return list(range(self.rank * w, (self.rank + 1) * w))

    def slot_size(self, slot: int) -> int:
        return slot_size(self.index.num_samples, self.num_slots, slot, self.config.equalize)

    def num_batches(self, batch_size: int) -> int:
        """Batches this rank yields per full epoch (each worker ends with its own partial batch)."""
        return sum(math.ceil(self.slot_size(s) / batch_size) for s in self.rank_slots)

    def set_epoch(self, epoch: int) -> None:
        """Starts stream epoch `epoch` from its beginning at the next iter()."""
        self.progress.set_epoch(epoch)

    def loader(self, *, batch_size: int, collate_fn: Callable | None = None, pin_memory: bool = False) -> DataLoader:
        """A DataLoader with this stream's worker count, non-persistent workers, `collate_records` by default."""
        self.batch_size = batch_size
        return DataLoader(
            self,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_fn or collate_records,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    def plan(self, epoch: int, slot: int) -> dict[str, np.ndarray]:
        """The slot's epoch as (T,) arrays: shard number, record number in shard, sample number in record."""
        cfg, idx = self.config, self.index
        order = np.arange(len(idx.shards))
        if cfg.shuffle:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(order)
        shard = np.concatenate([np.full(int(idx.samples[s].sum()), s) for s in order])
        rec = np.concatenate([np.repeat(np.arange(len(idx.samples[s])), idx.samples[s]) for s in order])
        counts = np.concatenate([idx.samples[s] for s in order])
        first = np.repeat(np.cumsum(counts) - counts, counts)  # global position of each record's sample 0
        sub = np.arange(len(rec)) - first
        g = (slot + self.num_slots * np.arange(self.slot_size(slot))) % len(rec)  # "pad" wraps around
        if cfg.shuffle:
            g = g[buffer_order(len(g), cfg.buffer_size, np.random.default_rng([cfg.seed, epoch, slot]))]
        if cfg.group_by_length:
            if self.batch_size is None:
                raise RuntimeError("stream.group_by_length groups whole batches: build the DataLoader with "
                                   "dataset.loader(batch_size=...)")
            lengths = np.concatenate([idx.lengths[s] for s in order])
            g = g[grouped_order(lengths[g], cfg.group_by_length * self.batch_size, self.batch_size,
                                np.random.default_rng([cfg.seed, epoch, slot, 1]))]
        return {"shard": shard[g], "record": rec[g], "sample": sub[g]}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 0) if info is None else (info.id, info.num_workers)
        if workers != self.num_workers:
            raise RuntimeError(
                f"StreamDataset was built for num_workers={self.num_workers} but runs with {workers}; "
                "build the DataLoader with dataset.loader()"
            )
        self.index.check_unchanged()  # one stat per shard: offsets into an edited file would read garbage
        slot = self.rank * max(workers, 1) + worker
        epoch = self.progress.epoch
        plan = self.plan(epoch, slot)
        size = len(plan["shard"])
        index, yielded = self.progress.resume_point(slot)
        unreadable = SkipLog("unreadable image")
        misses = 0  # unreadable images in a row: only a whole pass of them means there is nothing to read
        bad: set[int] = set()  # positions found unreadable: padding passes over them without a second try
        cache: OrderedDict = OrderedDict()  # an expanded record's samples come back within a buffer length
        reader = RecordReader(self.index)
        try:
            while yielded < size:
                if misses >= size:
                    raise RuntimeError(f"slot {slot}: no readable image in a full pass over its samples "
                                       f"(first unreadable: {unreadable.first[0]})")
                i = index % size  # past the end only when images were skipped: pad from the start
                index += 1
                if i in bad:
                    misses += 1
                    continue
                shard, rec, sub = int(plan["shard"][i]), int(plan["record"][i]), int(plan["sample"][i])
                record, samples = self._read(reader, cache, shard, rec)
                image = None
                if self.transform is not None:
                    path = resolve_image(record.image, self.index.shards[shard].root)
                    try:
                        image = self._image(path)
                    except ImageError as e:
                        context = f"{e.reason} (record {record.id!r} at {reader.where(shard, rec)})"
                        if self.config.policy == "error":
                            raise ImageError(e.path, context) from None
                        where = f"{e.path}: {context}"
                        unreadable.add(where)
                        bad.add(i)
                        misses += 1
                        if unreadable.count & (unreadable.count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: at once
                            log.warning("slot %d: skipped unreadable image %s (policy 'skip'; %d so far)", slot,
                                        where, unreadable.count)
                        continue
                misses = 0
                yielded += 1
                yield {
                    "record": record,
                    "sample": None if samples is None else samples[sub],
                    "image": image,
                    "_pos": StreamPos(epoch, slot, index, yielded),
                }
        finally:  # also when training stops mid-epoch and the generator is closed
            reader.close()
            unreadable.report()

    def _read(self, reader: RecordReader, cache: OrderedDict, shard: int, rec: int):
        key = (shard, rec)
        if key not in cache:
            record = reader.read(shard, rec)
            samples = None if self.expand is None else self.expand(record)
            if samples is not None and len(samples) != int(self.index.samples[shard][rec]):
                raise RuntimeError(
                    f"{reader.where(shard, rec)}: expand() returned {len(samples)} samples, "
                    f"{int(self.index.samples[shard][rec])} while indexing: it must be deterministic"
                )
            cache[key] = (record, samples)
            if len(cache) > self.config.buffer_size + 64:  # the buffer scatters a record's samples this far
                cache.popitem(last=False)
        return cache[key]


def collate_records(batch: list[dict]) -> dict:
    """{"records": [Record], "samples": [dict | None], "images": (B, C, H, W) or None, "_pos": [StreamPos]}."""
    images = [b["image"] for b in batch]
    if all(im is None for im in images):
        stacked = None
    elif any(im is None for im in images):
        raise ValueError("a batch mixes samples with and without images")
    else:
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"cannot stack images of shapes {sorted(shapes)}: the transform must fix the size")
        stacked = torch.stack(images)
    return {
        "records": [b["record"] for b in batch],
        "samples": [b["sample"] for b in batch],
        "images": stacked,
        "_pos": [b["_pos"] for b in batch],
    }
