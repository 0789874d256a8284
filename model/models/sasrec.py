"""SASRec (Kang & McAuley 2018) with RecBole's defaults, as the attention baseline.

Learned absolute positions over a window of max_len items, a causal mask, post-LN transformer
blocks. Positions count from the window's first item, so sliding the window changes every
position: SASRec is scored by recomputing the window, like the paper MLSA4Rec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.models.base import SequentialRecommender, init_normal


@dataclass
class SASRecConfig:
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    max_len: int = 50


class TransformerBlock(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.out = nn.Linear(c.hidden, c.hidden)
        self.attn_dropout = c.attn_dropout
        self.dropout = nn.Dropout(c.dropout)
        self.norm1 = nn.LayerNorm(c.hidden, eps=1e-12)
        self.ff1 = nn.Linear(c.hidden, c.inner)
        self.ff2 = nn.Linear(c.inner, c.hidden)
        self.norm2 = nn.LayerNorm(c.hidden, eps=1e-12)

    def forward(self, x, mask):
        b, l, d = x.shape
        q, k, v = (t.view(b, l, self.n_heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.norm1(self.dropout(self.out(context.transpose(1, 2).reshape(b, l, d))) + x)
        return self.norm2(self.dropout(self.ff2(F.gelu(self.ff1(x)))) + x)


class SASRec(SequentialRecommender):
    causal = True          # trains with a loss at every position; no step (see module doc)
    steppable = False
    name = "sasrec"

    def __init__(self, n_items: int, config: SASRecConfig | None = None):
        config = config or SASRecConfig()
        super().__init__(n_items, config)
        c = config
        self.item_embedding = nn.Embedding(n_items, c.hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(c.max_len, c.hidden)
        self.emb_norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.emb_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layers))
        self.apply(init_normal(0.02))

    def sequence_output(self, item_seq):
        length = item_seq.shape[1]
        positions = torch.arange(length, device=item_seq.device)
        x = self.emb_dropout(self.emb_norm(self.embed_items(item_seq)
                                           + self.position_embedding(positions)))
        # Causal and key-padding mask; a query never sees a later item or a pad (an unknown
        # item, OOV = -1, is an item: it keeps its neutral vector as a key).
        visible = torch.ones(length, length, dtype=torch.bool, device=item_seq.device).tril()
        mask = visible & (item_seq != 0)[:, None, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=item_seq.device)  # no empty rows
        for block in self.blocks:
            x = block(x, mask)
        return x
