"""Stage 1 under Lightning DDP on 2 CPU processes (gloo), launched by tests/training/test_ddp_stage1.py.

Lightning's `ddp` strategy starts rank 1 by re-running this command line with rank variables set,
so this must be a plain script (inside pytest it would re-run pytest). Each rank records the losses
of every training step and, after the last step, its trainable parameters, into `out_dir`:
`rank{r}.json` (losses, seen text keys) and `rank{r}.pt` (parameters).

    python tests/helpers/ddp_stage1_script.py OUT_DIR [STEPS]

`build_lit()` and `GlobalBatch` are imported by the test for the single-process reference, so both
sides build bit-identical weights and data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

GLOBAL_BATCH, WORLD = 8, 2
T, N, VOCAB = 12, 17, 64  # text tokens (fixed padding: gathered tensors need one shape on every rank)
CLS, SEP, PAD, DEC = 1, 2, 0, VOCAB - 1
# Non-pad lengths per sample. DistributedSampler(shuffle=False) deals samples round-robin (rank 0:
# 0,2,4,6; rank 1: 1,3,5,7), and both ranks get the lengths {10, 8, 6, 12}: ITG is a mean over
# tokens per rank, so it equals the global mean only when ranks hold equally many tokens.
LENGTHS = [10, 10, 8, 8, 6, 6, 12, 12]
# Samples 0 and 1 share a caption (same text key, on different ranks) and 2, 3, 5 an emotion label:
# positives that cross ranks, so the gathered keys matter.
TEXT_KEYS = [7, 7, 11, 12, 13, 14, 15, 16]
LABEL_KEYS = [0, 1, 3, 3, -1, 3, -1, 2]


class GlobalBatch(Dataset):
    """8 fixed samples in PretrainCollate's format, with cached features instead of images."""

    def __init__(self, width: int):
        g = torch.Generator().manual_seed(1234)
        self.features = torch.randn(GLOBAL_BATCH, N, width, generator=g)  # pre-ln_vision tokens
        self.ids = torch.full((GLOBAL_BATCH, T), PAD, dtype=torch.long)
        self.mask = torch.zeros(GLOBAL_BATCH, T, dtype=torch.long)
        for i, n in enumerate(LENGTHS):
            body = torch.randint(3, VOCAB - 1, (n - 2,), generator=g)
            self.ids[i, :n] = torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])])
            self.mask[i, :n] = 1
        self.ids[1] = self.ids[0]  # the shared caption of TEXT_KEYS
        self.mask[1] = self.mask[0]

    def __len__(self) -> int:
        return GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "qf_ids": self.ids[i], "qf_mask": self.mask[i],
                "text_key": torch.tensor(TEXT_KEYS[i]), "label_key": torch.tensor(LABEL_KEYS[i])}

    def batch(self) -> dict:
        """The whole global batch, as the single-process run sees it."""
        return {k: torch.stack([self[i][k] for i in range(GLOBAL_BATCH)]) for k in self[0]}


def build_lit():
    """A tiny stage-1 model without dropout (so both runs compute the same function), seeded."""
    from expvl.models.blip2 import Blip2, Blip2Config
    from expvl.models.optim import OptimConfig
    from expvl.models.qformer import QFormerConfig
    from expvl.models.vision import VisionConfig
    from expvl.training.lit_blip2 import LitPretrain
    from expvl.training.stages import trainable

    class Recording(LitPretrain):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.records: list[dict] = []

        def _step(self, batch, split):
            out = super()._step(batch, split)
            self.records.append({**{k: float(v.detach()) for k, v in out.items()},
                                 "text_keys": batch["text_key"].tolist()})
            return out

    torch.manual_seed(0)
    qf = QFormerConfig.from_name("tiny", vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0)
    model = Blip2(Blip2Config(vision=VisionConfig.from_name("tiny-vit"), qformer=qf, embed_dim=16))
    # no warm-up, so the first step really moves the weights (the sync check needs a change to see)
    optim = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, warmup_lr=1e-3)
    return Recording(model, trainable=trainable(model), optim=optim, total_steps=10, dec_token_id=DEC,
                     pad_token_id=PAD)


def trainable(lit) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in lit.model.named_parameters() if p.requires_grad}


def main(out_dir: str, steps: int) -> None:
    import lightning as L

    torch.set_num_threads(1)
    lit = build_lit()
    data = GlobalBatch(lit.model.vision.width)

    class Loader(L.LightningDataModule):
        def train_dataloader(self):
            # built inside fit, after the Trainer has set up the process group the sampler reads
            sampler = DistributedSampler(data, shuffle=False)
            return DataLoader(data, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler)

    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=Loader())
    rank = trainer.global_rank
    out = Path(out_dir)
    torch.save(trainable(lit), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": trainer.world_size,
                                                      "steps": lit.records}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
