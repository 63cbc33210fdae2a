"""The key/value cache of incremental decoding: each layer's keys and values of the positions seen so
far, so that generating one token attends to them without recomputing them (models/llm.py writes
it, models/generation.py drives it; beam search reorders its rows). tests/models/test_llm.py checks that a
cached forward equals the full one.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values of the tokens seen so far, in buffers that grow by doubling.

    `capacity` reserves that many positions on the first write (generation knows prompt + max new
    tokens, so it never reallocates). `length` advances once per model forward, after all layers.
    """

    def __init__(self, n_layers: int, capacity: int = 0):
        self.k: list[torch.Tensor | None] = [None] * n_layers  # each (B, Hkv, capacity, hd)
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # positions already stored
        self.capacity = capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) after the cached ones; return all keys/values (B, Hkv, length+T, hd)."""
        end = self.length + k.shape[2]
        buf = self.k[layer]
        if buf is None or end > buf.shape[2]:
            size = max(end, self.capacity, 2 * buf.shape[2] if buf is not None else 0)
            for store, new in ((self.k, k), (self.v, v)):
                grown = new.new_zeros(new.shape[0], new.shape[1], size, new.shape[3])
                if store[layer] is not None:
                    grown[:, :, :self.length] = store[layer][:, :, :self.length]
                store[layer] = grown
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reordering, or expanding a prompt to candidates)."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
