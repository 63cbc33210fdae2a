"""The three Q-Former masks against truth tables written out by hand (reference §1.2).

Layout [Q=2 queries | T=3 text]; sample 0 has no padding, sample 1 pads its last text token.
Rows are "from", columns "to"; 1 = may attend.
"""

import pytest
import torch

from expvl.models.qformer_masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask

TEXT_MASK = torch.tensor([[1, 1, 1],
                          [1, 1, 0]])

UNIMODAL = [
    [[1, 1, 0, 0, 0],   # q0: queries only
     [1, 1, 0, 0, 0],   # q1
     [0, 0, 1, 1, 1],   # t0: text only
     [0, 0, 1, 1, 1],   # t1
     [0, 0, 1, 1, 1]],  # t2
    [[1, 1, 0, 0, 0],
     [1, 1, 0, 0, 0],
     [0, 0, 1, 1, 0],   # the padded t2 is nobody's key
     [0, 0, 1, 1, 0],
     [0, 0, 1, 1, 0]],  # the padded row itself still reads the real text (LAVIS: key-only padding)
]
BIDIRECTIONAL = [
    [[1, 1, 1, 1, 1]] * 5,
    [[1, 1, 1, 1, 0]] * 5,
]
MULTIMODAL_CAUSAL = [
    [[1, 1, 0, 0, 0],   # q0: queries only, never text
     [1, 1, 0, 0, 0],   # q1
     [1, 1, 1, 0, 0],   # t0: all queries + itself
     [1, 1, 1, 1, 0],   # t1: all queries + t0, t1
     [1, 1, 1, 1, 1]],  # t2
    [[1, 1, 0, 0, 0],
     [1, 1, 0, 0, 0],
     [1, 1, 1, 0, 0],
     [1, 1, 1, 1, 0],
     [1, 1, 1, 1, 0]],  # t2 is padding: its own column is masked
]


@pytest.mark.parametrize("fn, table", [(unimodal_mask, UNIMODAL), (bidirectional_mask, BIDIRECTIONAL),
                                       (multimodal_causal_mask, MULTIMODAL_CAUSAL)])
@pytest.mark.parametrize("as_bool", [False, True])
def test_truth_table(fn, table, as_bool):
    text_mask = TEXT_MASK.bool() if as_bool else TEXT_MASK
    got = fn(2, text_mask)
    assert got.dtype == torch.bool and got.shape == (2, 5, 5)
    assert torch.equal(got, torch.tensor(table, dtype=torch.bool))


def test_text_only_layouts():
    """Q = 0 (the text-only pass): unimodal and bidirectional are both plain padding masks."""
    text_mask = torch.tensor([[1, 1, 0]])
    expected = torch.tensor([[[1, 1, 0]] * 3], dtype=torch.bool)
    assert torch.equal(unimodal_mask(0, text_mask), expected)
    assert torch.equal(bidirectional_mask(0, text_mask), expected)
    causal = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)
    assert torch.equal(multimodal_causal_mask(0, text_mask), causal)


def test_queries_only_layout():
    """T = 0 (the query pass): every mask lets queries see all queries."""
    text_mask = torch.ones(2, 0, dtype=torch.long)
    for fn in (unimodal_mask, bidirectional_mask, multimodal_causal_mask):
        assert torch.equal(fn(3, text_mask), torch.ones(2, 3, 3, dtype=torch.bool))
