"""Cross-attention with the image K/V weights absorbed into the queries, as one autograd Function.

The algebra is in models/qformer.py `CrossAttention` (per head h, with hd-dim slices
Wk_h, Wv_h of shape (hd, E) and image tokens X (N, E)):

    A_h = q_h Wk_h          S_h = A_h X^T          P_h = softmax(S_h + mask)
    C_h = P_h X             y_h = C_h Wv_h^T + rowsum(P_h) bv_h

Written with autograd ops, the per-head products want the heads first, (H, B*T, .), and the
per-image products want the images first, (B, H*T, .): four (B, T, H, E)-sized layout copies per
layer and pass, a sizeable share of the Q-Former's step at BLIP-2 size. Here every (., E) tensor is kept in
one layout, (B, T, H, E): the per-image products see it as (B, T*H, E) rows and the per-head
products as (H, B*T, E) strided views written in place through `bmm(..., out=view)`, so nothing is
copied, and the query side q, y (B, T, H*hd) is already the Linear layers' layout.

Two terms need no arithmetic: the key bias adds q_h . bk_h to every score of a row, which softmax
ignores (its gradient is zero: returned as zeros so the parameter still takes part, as DDP
requires); and dropout draws its mask in (B, H, T, N) order, as `F.dropout` on the unabsorbed
probabilities would, so both implementations agree under the same seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*d) -> the strided view (H, B*T, d): no copy."""
    B, T, width = x.shape
    return x.view(B * T, num_heads, width // num_heads).transpose(0, 1)


class AbsorbedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, image, wk, bk, wv, bv, bias, num_heads: int, scale: float, dropout_p: float):
        """q (B, T, D) attends to image (B, N, E); wk, wv (D, E); bv (D,); bias (B, 1, 1, N) additive
        or None; bk (D,) takes no part (see above). Returns y (B, T, D), the attention output before
        the output projection."""
        B, T, D = q.shape
        N, E = image.shape[1:]
        H, hd = num_heads, D // num_heads
        dtype = q.dtype  # autocast: compute in the queries' dtype, as the unfused ops would
        image, wk, wv, bv = (t.to(dtype) for t in (image, wk, wv, bv))
        with torch.autocast(q.device.type, enabled=False):
            A = q.new_empty(B, T, H, E)
            torch.bmm(_heads_first(q, H), wk.view(H, hd, E), out=_heads_first(A.view(B, T, H * E), H))
            S = torch.bmm(A.view(B, T * H, E), image.transpose(1, 2)).view(B, T, H, N)
            acc = torch.promote_types(dtype, torch.float32)  # softmax in fp32 at least, as models.attention
            S = S.to(acc).mul_(scale) if bias is None else torch.add(bias.to(acc), S.to(acc), alpha=scale)
            P = torch.softmax(S, dim=-1).to(dtype)
            keep = None
            if dropout_p > 0:  # the scaled mask 0 | 1/(1-p), drawn in (B, H, T, N) order
                keep = F.dropout(P.new_ones(B, H, T, N), dropout_p).transpose(1, 2)
            Pd = P if keep is None else P * keep
            C = torch.bmm(Pd.view(B, T * H, N), image).view(B, T, H, E)
            y = q.new_empty(B, T, D)
            torch.bmm(_heads_first(C.view(B, T, H * E), H), wv.view(H, hd, E).transpose(1, 2),
                      out=_heads_first(y, H))
            rowsum = Pd.sum(-1)  # 1 without dropout
            y.view(B, T, H, hd).addcmul_(rowsum.unsqueeze(-1), bv.view(H, hd))
        ctx.save_for_backward(q, image, wk, wv, bv, P, keep, C, rowsum,
                              A if ctx.needs_input_grad[1] else None)
        ctx.shape, ctx.scale = (B, T, N, E, H, hd), scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, image, wk, wv, bv, P, keep, C, rowsum, A = ctx.saved_tensors
        B, T, N, E, H, hd = ctx.shape
        need_q, need_image, need_wk, need_bk, need_wv, need_bv = ctx.needs_input_grad[:6]
        dy = dy.contiguous().to(q.dtype)
        dy_h = _heads_first(dy, H)  # (H, B*T, hd)
        dq = dimage = dwk = dbk = dwv = dbv = None
        with torch.autocast(dy.device.type, enabled=False):
            if need_bv:
                dbv = (dy.view(B, T, H, hd) * rowsum.unsqueeze(-1)).sum((0, 1)).reshape(H * hd)
            if need_wv:
                dwv = torch.bmm(dy_h.transpose(1, 2), _heads_first(C.view(B, T, H * E), H)).view(H * hd, E)
            dC = dy.new_empty(B, T, H, E)
            torch.bmm(dy_h, wv.view(H, hd, E), out=_heads_first(dC.view(B, T, H * E), H))
            dPd = torch.bmm(dC.view(B, T * H, E), image.transpose(1, 2)).view(B, T, H, N)
            dPd += (dy.view(B, T, H, hd) * bv.view(H, hd)).sum(-1, keepdim=True)  # the rowsum term
            dP = dPd if keep is None else dPd * keep
            dS = P * (dP - (dP * P).sum(-1, keepdim=True)) * ctx.scale  # softmax backward
            dA = torch.bmm(dS.view(B, T * H, N), image).view(B, T, H, E)
            dA_h = _heads_first(dA.view(B, T, H * E), H)  # (H, B*T, E)
            if need_q:
                dq = dy.new_empty(B, T, H * hd)
                torch.bmm(dA_h, wk.view(H, hd, E).transpose(1, 2), out=_heads_first(dq, H))
            if need_wk:
                dwk = torch.bmm(_heads_first(q, H).transpose(1, 2), dA_h).view(H * hd, E)
            if need_bk:
                dbk = torch.zeros(H * hd, dtype=dy.dtype, device=dy.device)
            if need_image:
                Pd = P if keep is None else P * keep
                dimage = torch.bmm(Pd.view(B, T * H, N).transpose(1, 2), dC.view(B, T * H, E))
                dimage.baddbmm_(dS.view(B, T * H, N).transpose(1, 2), A.view(B, T * H, E))
        return dq, dimage, dwk, dbk, dwv, dbv, None, None, None, None
