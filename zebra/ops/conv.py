"""Depthwise causal conv1d with a carried state (Mamba2's short conv, SPEC 3.2), pure PyTorch.

x (B, T, C) with `state` (B, C, K-1): the last K-1 inputs before x (zeros at the start of a sequence).
Returns (y (B, T, C), new_state (B, C, K-1)). One function serves training, prefill and one-token decode,
so a prefill continued token by token sees exactly the same windows as one long forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, bias, state=None, doc_ids=None):
    # weight (C, 1, K), bias (C,); doc_ids (B, T): windows never reach into an earlier document
    Bsz, T, C = x.shape
    K = weight.shape[-1]
    if doc_ids is not None:
        return _doc_conv(x, weight, bias, doc_ids), None
    xt = x.transpose(1, 2)  # (B, C, T)
    if state is None:
        state = xt.new_zeros(Bsz, C, K - 1)
    full = torch.cat([state.to(xt.dtype), xt], dim=-1)  # (B, C, K-1+T)
    y = F.conv1d(full, weight, bias, groups=C)  # (B, C, T)
    new_state = full[:, :, -(K - 1):] if K > 1 else full[:, :, :0]
    return y.transpose(1, 2), new_state


def _doc_conv(x, weight, bias, doc_ids):
    """y_t = bias + sum_j w[K-1-j] x_{t-j} [doc_{t-j} == doc_t]: the conv of each packed document alone."""
    T, K = x.shape[1], weight.shape[-1]
    y = bias.to(x.dtype).expand_as(x).clone() if bias is not None else torch.zeros_like(x)
    for j in range(K):
        xs = F.pad(x, (0, 0, j, 0))[:, :T]  # x_{t-j}, zeros before the start
        same = F.pad(doc_ids, (j, 0), value=-1)[:, :T] == doc_ids  # (B, T)
        y = y + xs * same[..., None].to(x.dtype) * weight[:, 0, K - 1 - j].to(x.dtype)
    return y
