"""Linear probes on frozen features: AU detection F1 and emotion accuracy (Exp-BLIP §4.3, Tables 3-4).

Exp-BLIP's protocol (the paper's linear-probe description under Tables 3-4): one FC layer on
top of a frozen representation; AU probes are multi-label (BCE, a logit > 0 = probability > 0.5
is a detection) scored by per-AU F1 of the positive class and its mean; emotion probes are
single-label (CE over vocab.facs.EMOTIONS) scored by top-1 accuracy. How the Q-Former's
Q x D output is pooled is NOT stated by Exp-BLIP: we take the mean over queries (`pool_queries`),
the same reduction BLIP-2's ITM head uses, and the mean of the encoder tokens (`pool_tokens`).
For an encoder whose tokens carry no position (the embedded default's conv tower) both are
flattened instead: there the token order is the only record of *where* something shows, a mean
over tokens loses it (the encoder's AU probe reads the flattened tokens clearly better), and the
supervised encoder pretraining's heads read exactly the flattened tokens (training/lit_bootstrap.py).

What the two columns of the report's "probes" table mean (`run_probes`):
- "probe":      a linear probe on the pooled Q-Former query outputs (language-supervised stages).
- "supervised": the same probe on the pooled tokens of the frozen image encoder that the Q-Former
                reads. In the embedded default that encoder was itself trained supervised on the
                same AU / emotion labels with linear heads on the flattened tokens (pipeline step
                "encoder", LitEncoderPretrain); its heads are not saved, and re-fitting the linear
                head is a convex problem, so this probe is the "same encoder + linear head trained
                on the labels" reference: "probe" > "supervised" means the language stages added
                something the labels alone did not. With a real recipe (pretrained CLIP / EVA
                encoder, no label training) the column is instead the encoder's own probe.
- "instruct":   the same probe on the pooled query outputs of the stage-3 (instruction) Q-Former,
                run without an instruction, when the run has one: whether the VQA stage kept, lost
                or added what the probes read.

Everything is deterministic given `ProbeConfig.seed` (zero-initialised head, seeded shuffling;
the global RNG is not touched). Checked against the protocol text above and, for the metrics,
evaluation/metrics.py (AUMetrics / EmotionMetrics are used as they are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expvl.datamodules.labels import au_targets, emotion_targets
from expvl.evaluation.metrics import AUMetrics, EmotionMetrics
from expvl.models.losses import au_bce
from expvl.vocab.facs import EMOTIONS, SYNTHFACS_AUS

TASKS = ("au", "emotion")


@dataclass
class ProbeConfig:
    epochs: int = 100  # passes over the train features (Exp-BLIP: 100 on BP4D, 400 on RAF-AU)
    batch_size: int = 256  # minibatch size; 0 = full batch
    lr: float = 1e-2  # AdamW peak learning rate, cosine-decayed to 0 over all steps
    weight_decay: float = 1e-4  # AdamW decoupled weight decay (on the weight only, not the bias)
    seed: int = 0  # minibatch order (the head starts at zero, so this is the only randomness)


# ------------------------------------------------------------------------------ pooling

def pool_tokens(tokens: torch.Tensor, *, flatten: bool = False) -> torch.Tensor:
    """Encoder tokens (M, N, D) -> (M, D) mean over all N tokens (prefix/CLS included), or (M, N*D)."""
    if tokens.dim() != 3:
        raise ValueError(f"pool_tokens expects (M, N, D) tokens, got shape {tuple(tokens.shape)}")
    return tokens.float().flatten(1) if flatten else tokens.float().mean(dim=1)


def pool_queries(query_hidden: torch.Tensor, *, flatten: bool = False) -> torch.Tensor:
    """Q-Former query outputs (M, Q, D) -> (M, D) mean over queries, or (M, Q*D).

    Exp-BLIP does not state how its 32 x 768 output is pooled; the mean is our choice.
    """
    if query_hidden.dim() != 3:
        raise ValueError(f"pool_queries expects (M, Q, D) query outputs, got shape {tuple(query_hidden.shape)}")
    return query_hidden.float().flatten(1) if flatten else query_hidden.float().mean(dim=1)


# ------------------------------------------------------------------------------ labels

# ------------------------------------------------------------------------------ the probe

def _check(name: str, x: torch.Tensor, y: torch.Tensor, task: str, n_labels: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}_x must be pooled features (M, D), got shape {tuple(x.shape)}")
    want = (x.shape[0], n_labels) if task == "au" else (x.shape[0],)
    if tuple(y.shape) != want:
        raise ValueError(f"{name}_y has shape {tuple(y.shape)}, expected {want} for task {task!r}")


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                task: str, labels: Sequence[str] | None = None, train_annotated: torch.Tensor | None = None,
                test_annotated: torch.Tensor | None = None, config: ProbeConfig | None = None) -> dict:
    """Fit one linear layer on frozen features and score it on the test features.

    Args:
        train_x, test_x: pooled features (M, D); standardised with the TRAIN mean / std.
        train_y, test_y: task "au": (M, A) 0/1; task "emotion": (M,) class index, -1 = no label
            (those rows are skipped in training and scoring).
        task: "au" (multi-label BCE, threshold 0.5) or "emotion" (CE, argmax).
        labels: AU names (default SYNTHFACS_AUS) or emotion names (default EMOTIONS).
        train_annotated, test_annotated: (M, A) bool for "au"; unannotated entries carry no loss
            and no count (None = all annotated).
    Returns: {"task", "metric" ("macro_f1" | "accuracy"), "value": test metric, "train_value",
        "test": AUMetrics / EmotionMetrics .compute() on test, "steps", "n_train", "n_test"}.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cfg = config or ProbeConfig()
    labels = list(labels or (SYNTHFACS_AUS if task == "au" else EMOTIONS))
    _check("train", train_x, train_y, task, len(labels))
    _check("test", test_x, test_y, task, len(labels))
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features are {train_x.shape[1]}-d, test features {test_x.shape[1]}-d")

    train_x, test_x = train_x.detach().float().cpu(), test_x.detach().float().cpu()
    if task == "au":
        train_y, test_y = train_y.float().cpu(), test_y.float().cpu()
        train_m = torch.ones_like(train_y, dtype=torch.bool) if train_annotated is None else train_annotated.bool().cpu()
        test_m = torch.ones_like(test_y, dtype=torch.bool) if test_annotated is None else test_annotated.bool().cpu()
    else:  # records without an emotion label take no part
        keep_tr, keep_te = train_y >= 0, test_y >= 0
        train_x, train_y = train_x[keep_tr], train_y[keep_tr].long().cpu()
        test_x, test_y = test_x[keep_te], test_y[keep_te].long().cpu()
        train_m = test_m = None
    if len(train_x) == 0:
        raise ValueError(f"no training rows with a {task} label")

    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    head = nn.Linear(train_x.shape[1], len(labels))
    nn.init.zeros_(head.weight)  # the problem is convex: a fixed start makes the fit a function of the data
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": cfg.weight_decay},
                             {"params": [head.bias], "weight_decay": 0.0}], lr=cfg.lr)
    M = len(train_x)
    bs = M if cfg.batch_size <= 0 else min(cfg.batch_size, M)
    per_epoch = math.ceil(M / bs)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total, 1))))
    gen = torch.Generator().manual_seed(cfg.seed)

    for _ in range(cfg.epochs):
        order = torch.randperm(M, generator=gen)
        for i in range(0, M, bs):
            idx = order[i:i + bs]
            logits = head(train_x[idx])
            if task == "au":
                loss = au_bce(logits, train_y[idx], annotated=train_m[idx])
            else:
                loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        train_scores = _score(head(train_x), train_y, train_m, task, labels)
        test_scores = _score(head(test_x), test_y, test_m, task, labels)
    metric = "macro_f1" if task == "au" else "accuracy"
    return {"task": task, "metric": metric, "value": test_scores[metric], "train_value": train_scores[metric],
            "test": test_scores, "steps": total, "n_train": M, "n_test": len(test_x)}


def _score(logits: torch.Tensor, y: torch.Tensor, annotated: torch.Tensor | None, task: str,
           labels: list[str]) -> dict:
    if task == "au":
        m = AUMetrics(labels)
        if len(y):
            m.update((logits > 0).long(), y.long(), annotated)  # logit > 0  <=>  sigmoid > 0.5
        return m.compute()
    m = EmotionMetrics(labels)
    if len(y):
        m.update(logits.argmax(dim=1), y)
    return m.compute()


# ------------------------------------------------------------------------------ both columns

def run_probes(train: dict, test: dict, *, train_records: Sequence, test_records: Sequence,
               config: ProbeConfig | None = None) -> dict:
    """The report's "probes" section: every task, probe vs supervised reference.

    Args:
        train, test: {"probe": (M, D) pooled Q-Former features, "supervised": (M, D') pooled
            frozen-encoder features, optionally "instruct": (M, D) pooled queries of the stage-3
            Q-Former} for the same records, in the order of train_records / test_records (see the
            module docstring for what each column means); every column gets the same probe.
    Returns: {"au": {"metric": "macro_f1", "probe": float, "supervised": float, "details": {...}},
              "emotion": {"metric": "accuracy", ...}}; details hold the full train_probe results.
    """
    for name, feats, recs in (("train", train, train_records), ("test", test, test_records)):
        for kind, x in feats.items():
            if len(x) != len(recs):
                raise ValueError(f"{name}[{kind!r}] has {len(x)} rows for {len(recs)} records")
    au_tr, au_te = au_targets(train_records), au_targets(test_records)
    em_tr, em_te = emotion_targets(train_records), emotion_targets(test_records)
    out = {}
    for task in TASKS:
        row, details = {}, {}
        for kind in train:  # "probe", "supervised" and, for a run with stage 3, "instruct"
            if task == "au":
                r = train_probe(train[kind], au_tr["targets"], test[kind], au_te["targets"], task="au",
                                train_annotated=au_tr["annotated"], test_annotated=au_te["annotated"],
                                config=config)
            elif (em_tr >= 0).any():
                r = train_probe(train[kind], em_tr, test[kind], em_te, task="emotion", config=config)
            else:
                continue  # no emotion labels in this dataset
            row["metric"], row[kind], details[kind] = r["metric"], r["value"], r
        if row:
            out[task] = {**row, "details": details}
    return out
