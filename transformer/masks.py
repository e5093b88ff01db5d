"""Attention masks, built here and nowhere else.

One convention everywhere: a boolean tensor, True = "may attend", broadcastable
to (B, H, Tq, Tk). This is the convention of F.scaled_dot_product_attention.
Masks are combined with `&`.
"""

import torch


def padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, L) token ids -> (B, 1, 1, L): True where the key is a real token."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, L, L): position i may attend to positions 0..i (section 3.2.3)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]

