"""One LightningDataModule for every stage: a streaming train split, a streaming val split, a collator.

The stage decides the sample expansion and the collator (datamodules/collate.py); the data never
changes shape otherwise. Resume: the stream's consumed positions are stored in Lightning checkpoints
through `state_dict` / `load_state_dict` (see datamodules/stream.py), so a killed run restarts
mid-epoch without repeating or skipping samples.

What the run trains on is checked when the training stream is built: no record of the training split
may also be in another split of the dataset (a face in train and test inflates every test metric),
and the checkpoint records the sha256 of every training shard it read (`inputs`), so resuming over
data that changed since stops with the changed shard named rather than finishing the stage half on
the old records and half on the new ones. Retraining the affected steps instead would need to know
which steps read which records; the shards are shuffled across every step, so each step may have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from expvl.datamodules.sources import ShardError, build_index, changed_inputs, discover_shards, duplicate_ids
from expvl.datamodules.stream import StreamConfig, StreamDataset, StreamProgress
from expvl.vocab.records import Record

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    root: str = ""  # dataset folder holding manifest.json and the JSONL shards
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 32  # per device
    val_batch_size: int = 64
    num_workers: int = 0  # DataLoader workers per device
    stream: StreamConfig = field(default_factory=StreamConfig)


class StageDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, *, expand: Callable[[Record], list[dict]], collate: Callable,
                 transform: Callable | None = None, val_transform: Callable | None = None,
                 cache_images: bool = False, augment: Callable | None = None):
        """cache_images: the training stream keeps each transformed image after its first decode
        (StreamDataset), so `transform` must be deterministic; augment: (B, C, H, W) -> same, applied
        to training batches after they reach the device (e.g. images.random_resized_crop)."""
        super().__init__()
        self.cache_images, self.augment = cache_images, augment
        if not cfg.root:
            raise ValueError("data.root is empty: point it at a dataset folder written by `python -m expvl.synthesis`")
        self.cfg = cfg
        self.expand, self.collate = expand, collate
        self.transform, self.val_transform = transform, val_transform
        self.progress = StreamProgress()
        self.inputs: dict[str, str] | None = None  # training shard -> sha256 of the stream built last
        self._resumed_inputs: dict[str, str] | None = None  # the same, recorded by the checkpoint resumed
        self._splits_checked = False

    def _stream(self, split: str, *, train: bool) -> StreamDataset:
        stream_cfg = self.cfg.stream if train else StreamConfig(shuffle=False, equalize="pad",
                                                               policy=self.cfg.stream.policy)
        stream = StreamDataset(Path(self.cfg.root), split=split, config=stream_cfg,
                               transform=self.transform if train else self.val_transform, expand=self.expand,
                               num_workers=self.cfg.num_workers, progress=self.progress if train else None,
                               cache_images=self.cache_images and train)
        if train:
            self._check_inputs(stream)
        return stream

    def _check_inputs(self, stream: StreamDataset) -> None:
        """Refuse training records that are in another split too, and data changed since the checkpoint."""
        if not self._splits_checked:
            others = [s for s in discover_shards(Path(self.cfg.root)) if s.split != self.cfg.train_split]
            if others:
                other = build_index(others, policy=self.cfg.stream.policy)
                duplicate = duplicate_ids(stream.index.shards + other.shards, stream.index.ids + other.ids)
                if duplicate:
                    raise ShardError(duplicate)
            self._splits_checked = True
        self.inputs = stream.index.fingerprint()
        if self._resumed_inputs is not None:
            changed = changed_inputs(self._resumed_inputs, self.inputs)
            if changed:
                raise ShardError(f"{self.cfg.root}: the training data changed since the checkpoint being resumed: "
                                 f"{changed}. The steps taken so far trained on the old records; restore the "
                                 "data, or train this stage again from its start (without the checkpoint)")

    def train_dataloader(self):
        return self._stream(self.cfg.train_split, train=True).loader(batch_size=self.cfg.batch_size,
                                                                     collate_fn=self.collate)

    def val_dataloader(self):
        if not self.cfg.val_split:
            return []
        present = {s.split for s in discover_shards(Path(self.cfg.root))}
        if self.cfg.val_split not in present:  # e.g. a dataset with only its official train / test partition
            log.warning("%s has no %r split (it has %s): training without validation", self.cfg.root,
                        self.cfg.val_split, sorted(str(s) for s in present))
            return []
        return self._stream(self.cfg.val_split, train=False).loader(batch_size=self.cfg.val_batch_size,
                                                                    collate_fn=self.collate)

    def num_train_batches(self) -> int:
        """Batches per epoch on this rank (for the LR schedule's length)."""
        return self._stream(self.cfg.train_split, train=True).num_batches(self.cfg.batch_size)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Move the batch's top-level tensors; pass everything else through untouched.

        Lightning's default walks the whole batch with `apply_to_collection`, which deep-copies every
        dataclass it meets: our batches carry their `Record`s (labels, VQA pairs) and stream
        positions, and copying them cost a noticeable share of an encoder-bootstrap step while
        nothing in them goes to the device. Every collate here returns a flat dict of tensors and
        plain Python values; anything else gets Lightning's default.
        """
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            self.progress.consume(batch["_pos"])
            if self.augment is not None:
                batch = {**batch, "images": self.augment(batch["images"])}
        return batch

    def state_dict(self):
        state = self.progress.state_dict(gather_ranks=True)
        return state if self.inputs is None else {**state, "inputs": self.inputs}

    def load_state_dict(self, state_dict):
        self.progress.load_state_dict(state_dict)
        self._resumed_inputs = state_dict.get("inputs")  # None for checkpoints written before it was kept
