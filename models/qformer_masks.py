"""The three self-attention masks of the BLIP-2 Q-Former (BLIP-2 paper §3.1, Fig. 2 right).

Layout of the sequence the Q-Former attends over: `[Q learned queries | T text tokens]`, L = Q + T.
Every function returns a boolean "may attend" matrix of shape (B, L, L): `mask[b, i, j]` is True
when position i may attend to position j. Padding is a property of the *key* only, as in LAVIS's
`get_extended_attention_mask` (`causal[:, None] * attention_mask[:, None, None, :]`): a padded text
row still attends to the visible keys; its output is never used, but keeping the rule lets our
numbers match LAVIS / transformers on every row. Queries are never padding.

- `unimodal_mask` (ITC): queries see queries only, text sees (non-pad) text only. BLIP-2 gets the
  same effect with two separate passes (`QFormer.encode_queries` / `encode_text`); the matrix is
  kept so a single joint pass can be checked against those two passes.
- `bidirectional_mask` (ITM, InstructBLIP instruction input): everyone sees every non-pad token.
- `multimodal_causal_mask` (ITG): query rows see queries only; text row i sees all queries and the
  text up to and including itself. This is the effective matrix of LAVIS's ITG: query rows come
  from the query-only pass and are cached, text rows get `[ones(Q) | tril(T)]` times padding.

Checked against salesforce/LAVIS lavis/models/blip2_models/Qformer.py (`BertModel.
get_extended_attention_mask`) and blip2_qformer.py (`Blip2Qformer.forward`).
"""

from __future__ import annotations

import torch


def _visible_keys(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) True for every key that is not padding: all queries, then `text_mask`."""
    B = text_mask.shape[0]
    queries = torch.ones(B, num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: (B, L, L) with queries -> queries only and text -> non-pad text only.

    text_mask: (B, T), 1/True for real tokens, 0/False for padding.
    """
    keys = _visible_keys(num_queries, text_mask)  # (B, L)
    L = keys.shape[1]
    is_query = torch.arange(L, device=keys.device) < num_queries  # (L,)
    same_side = is_query[:, None] == is_query[None, :]  # (L, L)
    return same_side[None] & keys[:, None, :]


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM / instruction input: (B, L, L) with every position -> every non-pad position."""
    keys = _visible_keys(num_queries, text_mask)  # (B, L)
    L = keys.shape[1]
    return keys[:, None, :].expand(-1, L, L)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: (B, L, L) with queries -> queries only, text i -> all queries + non-pad text j <= i."""
    keys = _visible_keys(num_queries, text_mask)  # (B, L)
    L = keys.shape[1]
    pos = torch.arange(L, device=keys.device)
    key_is_query = pos[None, :] < num_queries  # (1, L)
    # a text row (i >= Q) also sees earlier text; for query rows j <= i adds nothing beyond queries
    text_causal = (pos[:, None] >= num_queries) & (pos[None, :] <= pos[:, None])  # (L, L)
    return (key_is_query | text_causal)[None] & keys[:, None, :]
