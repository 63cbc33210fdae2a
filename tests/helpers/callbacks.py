"""A Lightning callback for `trainer.callbacks` tests: records the batches it saw into a file."""

import json
from pathlib import Path

import lightning as L


class BatchCounter(L.pytorch.callbacks.Callback):
    def __init__(self, out: str, tag: str = "counted"):
        self.out, self.tag, self.batches = Path(out), tag, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        self.out.write_text(json.dumps({"tag": self.tag, "batches": self.batches, "steps": trainer.global_step}))
