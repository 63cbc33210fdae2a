"""A Lightning callback that makes every training step take a little longer, for tests that must
kill a run in the middle of a stage (tests/training/test_pipeline.py): on an idle machine the tiny
stage 3 could otherwise finish between a checkpoint and the kill. Passed as
`trainer.callbacks=[tests.helpers.slow_steps.SlowSteps]`; no step's inputs depend on it."""

import time

import lightning as L


class SlowSteps(L.pytorch.callbacks.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.25)
