"""Training losses as small pure functions: ITC, ITM hard-negative mining, ITG/LM, AU BCE.

BLIP-2 stage 1 (Li et al. 2023, section 3.2; LAVIS `blip2_qformer.py` `Blip2Qformer.forward`):
- ITC: the best-matching query per (image, text) pair, `sim = max_q <z_q, t> / temp`, cross-entropy
  both ways with label smoothing 0.1. Gathered features from other ranks carry no gradient, as in
  LAVIS; each rank's loss is the mean over its own rows, so the mean over ranks equals the
  single-process loss on the global batch.
- ITM: one hard negative per image and per text, drawn from softmax(sim) over the global batch.
- ITG / LM: shifted cross-entropy with -100 ignored (label smoothing 0.1 for the Q-Former's ITG,
  none for the frozen LLM, as in LAVIS).

Fix on purpose: the official code (LAVIS and the Exp-BLIP fork) treats only the exact diagonal as
positive. With template captions ("The face shows happiness.") many in-batch "negatives" are the
same text. `positives` (B, B_global) marks every pair that must not be a negative; ITC then uses
soft targets spread over the positives (as LAVIS HEAD does for equal image ids) and ITM never
samples them as negatives. For exact duplicate captions the ITC value does not change (duplicated
columns are interchangeable, tested); the fix matters for ITM, where an identical text drawn as a
"negative" is a false label, and for ITC with same-label positives whose texts differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_similarities(image_feats: torch.Tensor, text_feat: torch.Tensor, image_feats_all: torch.Tensor,
                     text_feat_all: torch.Tensor, temp: torch.Tensor) -> dict[str, torch.Tensor]:
    """image_feats (B, Q, E), text_feat (B, E) local and normalized; *_all (B_global, ...) gathered.

    Returns sim_i2t (B, B_global) and sim_t2i (B, B_global), already divided by temp.
    """
    sim_q2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat_all)  # (B, Bg, Q)
    sim_t2q = torch.einsum("be,nqe->bnq", text_feat, image_feats_all)  # (B, Bg, Q)
    return {"sim_i2t": sim_q2t.max(-1).values / temp, "sim_t2i": sim_t2q.max(-1).values / temp}


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, *, rank_offset: int,
             positives: torch.Tensor | None = None, label_smoothing: float = 0.1) -> torch.Tensor:
    """Contrastive loss; row b's positive is column rank_offset + b (plus `positives` if given)."""
    B, Bg = sim_i2t.shape
    if positives is None:
        targets = torch.arange(B, device=sim_i2t.device) + rank_offset
        return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    pos = positives.float()
    pos[torch.arange(B), torch.arange(B) + rank_offset] = 1.0  # the pair itself is always positive
    # LAVIS HEAD's soft targets: (1 - eps) spread over the positives, eps spread over all columns
    soft = (1 - label_smoothing) * pos / pos.sum(1, keepdim=True) + label_smoothing / Bg
    return (F.cross_entropy(sim_i2t, soft) + F.cross_entropy(sim_t2i, soft)) / 2


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, *, rank_offset: int,
                          positives: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """For each local image a negative text, and for each local text a negative image.

    Indices point into the global batch. Positives (the diagonal, and `positives` if given) get
    probability zero. A row with no negative left (every text in the batch identical) falls back
    to uniform over the non-diagonal columns, so the sample is still a different pair.
    """
    B, Bg = sim_i2t.shape
    blocked = torch.zeros(B, Bg, dtype=torch.bool, device=sim_i2t.device)
    blocked[torch.arange(B), torch.arange(B) + rank_offset] = True
    fallback = (~blocked).float()
    if positives is not None:
        blocked |= positives.bool()

    def draw(sim):
        w = sim.float().softmax(dim=1).masked_fill(blocked, 0.0)
        empty = w.sum(1) <= 0
        w[empty] = fallback[empty]
        return torch.multinomial(w, 1, generator=generator).squeeze(1)

    return {"neg_text_for_image": draw(sim_i2t), "neg_image_for_text": draw(sim_t2i)}


LOSS_NORMS = ("batch", "sample", "running")  # how stages 2/3 average the LM loss (StageConfig.loss_norm)


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool (B, T): the positions whose next token is a target (labels != -100 one step later).

    The shifted LM loss reads logits only there; `LLaMA.forward(logits_at=...)` computes just those."""
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = labels[:, 1:] != -100
    return where


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
            per_sample: bool = False, tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy over labels != -100. labels (B, T); logits (B, T, V) at every
    position, or (N, V) at `predicted_positions(labels)` only, row-major (as LLaMA.forward(logits_at=)
    returns them): the same loss without computing the other positions' logits.

    Mean over target tokens (the papers); with `per_sample` the mean over sequences of each
    sequence's token mean, so that a long answer does not outweigh a one-word one; with `tokens`
    the sum over target tokens divided by that number instead of this batch's own count (a
    running mean of it keeps the per-token weight of mixed batches when batches are grouped by
    length; training/lit_blip2.py LitLanguage).
    """
    where = predicted_positions(labels)
    if logits.dim() == 3:
        logits = logits[where]
    n_targets = int(where.sum())
    if logits.shape[0] != n_targets:
        raise ValueError(f"{logits.shape[0]} rows of logits for {n_targets} target tokens")
    targets = labels[:, 1:][where[:, :-1]]
    tok = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="none")  # (N,)
    if tokens is not None:
        return tok.sum() / tokens
    if not per_sample:
        return tok.mean()
    rows = where.nonzero()[:, 0]
    n = where.sum(1)
    has = n > 0
    return (tok.new_zeros(labels.shape[0]).index_add(0, rows, tok)[has] / n[has]).mean()


def au_bce(logits: torch.Tensor, targets: torch.Tensor, *, annotated: torch.Tensor | None = None,
           pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label AU loss. logits/targets (B, A); `annotated` (B, A) masks unlabelled AUs out."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pos_weight,
                                              reduction="none")
    if annotated is None:
        return loss.mean()
    m = annotated.float()
    return (loss * m).sum() / m.sum().clamp(min=1.0)
