"""Masking shared by every reference: a masked token takes no part, a row with no key outputs zeros.

The references differ in which tokens attend to which; how a mask acts is the
same for all of them (docs/spec.md#masks: masks are bool, True = a real token).
"""
from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; masked keys get no weight, rows with no key get zeros.

    Rows whose every key is masked are given finite scores before the softmax
    (and zeroed after), so that neither the output nor its gradient is NaN.
    """
    if key_mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~key_mask, float("-inf"))
    row_has_key = key_mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)
    return torch.softmax(scores, dim=-1) * row_has_key


def drop_masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` (..., P, H, D) with the tokens where `mask` (..., P) is False set to zero.

    A masked token takes no part, whatever it holds: a NaN or inf there would
    survive its zero attention weight (0 * nan = nan) in the output or the
    gradients, so it is replaced before any product (and gets a zero gradient).
    """
    if mask is None:
        return x
    return x.masked_fill(~mask[..., None, None], 0.0)
