"""Stage losses: ITC matches a hand computation, positives are never hard negatives, LM masking."""

import pytest
import torch
import torch.nn.functional as F

from expvl.models.losses import (
    au_bce,
    itc_loss,
    itc_similarities,
    lm_loss,
    predicted_positions,
    sample_hard_negatives,
)


def _feats(B=4, Q=3, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, Q, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    return img, txt


def test_itc_similarity_is_max_over_queries():
    img, txt = _feats()
    sims = itc_similarities(img, txt, img, txt, torch.tensor(0.1))
    manual = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(4)]) for i in range(4)]) / 0.1
    torch.testing.assert_close(sims["sim_i2t"], manual)
    torch.testing.assert_close(sims["sim_t2i"], manual.T)


def test_itc_split_across_ranks_equals_single_process():
    img, txt = _feats(B=6)
    temp = torch.tensor(0.07)
    full = itc_similarities(img, txt, img, txt, temp)
    single = itc_loss(full["sim_i2t"], full["sim_t2i"], rank_offset=0)
    per_rank = []
    for r in range(2):
        sl = slice(3 * r, 3 * r + 3)
        s = itc_similarities(img[sl], txt[sl], img, txt, temp)
        per_rank.append(itc_loss(s["sim_i2t"], s["sim_t2i"], rank_offset=3 * r))
    torch.testing.assert_close(torch.stack(per_rank).mean(), single)


def test_itc_positives_use_soft_targets():
    img, txt = _feats()
    s = itc_similarities(img, txt, img, txt, torch.tensor(0.1))
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 2] = pos[2, 0] = True  # e.g. two faces with the same emotion label
    soft = torch.eye(4)
    soft[0, 2] = soft[2, 0] = 1.0
    soft = 0.9 * soft / soft.sum(1, keepdim=True) + 0.1 / 4
    expected = (F.cross_entropy(s["sim_i2t"], soft) + F.cross_entropy(s["sim_t2i"], soft)) / 2
    got = itc_loss(s["sim_i2t"], s["sim_t2i"], rank_offset=0, positives=pos)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, itc_loss(s["sim_i2t"], s["sim_t2i"], rank_offset=0))
    # with no extra positives the soft form reduces to label-smoothed CE
    none = itc_loss(s["sim_i2t"], s["sim_t2i"], rank_offset=0, positives=torch.zeros(4, 4, dtype=torch.bool))
    torch.testing.assert_close(none, itc_loss(s["sim_i2t"], s["sim_t2i"], rank_offset=0))


def test_hard_negatives_never_pick_positives():
    sim = torch.zeros(4, 8)
    sim[:, 0] = 50.0  # column 0 would dominate the softmax
    pos = torch.zeros(4, 8, dtype=torch.bool)
    pos[:, 0] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg = sample_hard_negatives(sim, sim, rank_offset=4, positives=pos, generator=g)
        for idx in neg.values():
            assert (idx != 0).all()
            assert (idx != torch.arange(4) + 4).all()


def test_hard_negatives_fallback_when_all_blocked():
    sim = torch.randn(2, 2)
    pos = torch.ones(2, 2, dtype=torch.bool)
    neg = sample_hard_negatives(sim, sim, rank_offset=0, positives=pos)
    assert neg["neg_text_for_image"].tolist() == [1, 0]


def test_lm_loss_ignores_masked_and_shifts():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    # changing logits where the label is ignored changes nothing
    logits2 = logits.clone()
    logits2[0, 0] += 100
    torch.testing.assert_close(lm_loss(logits2, labels), expected)


@pytest.mark.parametrize("mode", [{}, {"per_sample": True}, {"tokens": 7.0}, {"label_smoothing": 0.1}])
def test_lm_loss_from_logits_at_predicted_positions_equals_full_logits(mode):
    """LLaMA.forward(logits_at=predicted_positions(labels)) returns (N, V): same loss, every reduction."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :4] = -100
    labels[1] = -100  # a row without targets
    labels[2, 3] = -100  # a hole inside the answer
    where = predicted_positions(labels)
    assert where.sum() == (labels[:, 1:] != -100).sum() and not where[:, -1].any()
    torch.testing.assert_close(lm_loss(logits[where], labels, **mode), lm_loss(logits, labels, **mode))
    with pytest.raises(ValueError, match="rows of logits"):
        lm_loss(logits[where][1:], labels, **mode)


def test_au_bce_masks_unannotated():
    logits = torch.randn(3, 4)
    t = torch.randint(0, 2, (3, 4))
    ann = torch.ones(3, 4, dtype=torch.bool)
    ann[:, 3] = False
    a = au_bce(logits, t, annotated=ann)
    logits[:, 3] = 1000.0
    torch.testing.assert_close(au_bce(logits, t, annotated=ann), a)


def test_lm_loss_per_sample_weights_sequences_equally():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :5] = -100  # row 0: one target token; row 1: five
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    n = (labels[:, 1:] != -100).sum(1)
    expected = ((tok.sum(1) / n)).mean()
    torch.testing.assert_close(lm_loss(logits, labels, per_sample=True), expected)
    assert not torch.allclose(lm_loss(logits, labels, per_sample=True), lm_loss(logits, labels))
    labels[0] = -100  # a row without targets is left out, not counted as zero
    torch.testing.assert_close(lm_loss(logits, labels, per_sample=True), tok[1].sum() / n[1])


def test_lm_loss_with_a_token_normaliser_divides_the_token_sum():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :6] = -100
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(lm_loss(logits, labels, tokens=n), lm_loss(logits, labels))
    torch.testing.assert_close(lm_loss(logits, labels, tokens=4 * n), lm_loss(logits, labels) / 4)
