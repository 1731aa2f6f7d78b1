"""The energies of one cross-attention layer and the closed-form Bayesian Context Update.

Shapes follow docs/EBCA.md, "Notation": ``query`` is ``[B, P, H*d_h]`` (image tokens), ``key`` is
``[B, N, H*d_h]`` (context tokens), both with heads concatenated; ``scale = d_h ** -0.5``.

The functions here are pure: the attention processor calls :func:`bcu_update` with the logits it
already computed for its forward pass, and the tests differentiate :func:`attention_energy` and
:func:`norm_energy` with autograd to check that the closed form is minus their gradient.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*d]`` -> ``[B, H, L, d]``."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` -> ``[B, L, H*d]``."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors go to float32 for softmax/logsumexp; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attention_logits(query: torch.Tensor, key: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """``S = scale * Q K^T`` per head: ``[B, H, P, N]`` (the logits of the forward attention)."""
    return torch.matmul(split_heads(query, heads), split_heads(key, heads).transpose(-1, -2)) * scale


def attention_energy(query: torch.Tensor, key: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """E(Q; K) per batch row, summed over heads (docs/EBCA.md, "Energies").

    ``E = - sum_i (1/scale) logsumexp_j (scale q_j . k_i)``: each context token i looks at all pixels j.
    """
    return attention_energy_from_logits(attention_logits(query, key, heads, scale), scale)


def attention_energy_from_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """E(Q; K) per batch row from the ``[B, H, P, N]`` logits a forward pass already computed."""
    return -(torch.logsumexp(_upcast(logits), dim=2) / scale).sum(dim=(1, 2))


def norm_energy(key: torch.Tensor) -> torch.Tensor:
    """The key prior per batch row: ``1/2 logsumexp_i ||k_i||^2`` over heads concatenated.

    The paper writes the prior without the 1/2; with it, the update ``u_i k_i`` with
    ``u = softmax(||k||^2)`` is exactly the gradient, which is what the tests check (docs/EBCA.md,
    "Energies").
    """
    return 0.5 * torch.logsumexp(_upcast(key).pow(2).sum(dim=-1), dim=-1)


def bcu_update(
    query: torch.Tensor,
    key: torch.Tensor,
    to_k_weight: torch.Tensor,
    *,
    heads: int,
    gamma_attn: float | torch.Tensor,
    gamma_norm: float | torch.Tensor,
    logits: torch.Tensor | None = None,
    scale: float | None = None,
    token_weights: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The context update ``dC`` of one layer, ``[B, N, d_c]`` (docs/EBCA.md, "Bayesian Context Update").

    - ``logits``: ``[B, H, P, N]`` from :func:`attention_logits`; computed here when omitted.
    - ``token_weights``: ``[B, N]`` multipliers of the attention term per row and token (step 3; the
      caller puts ones on the unconditional rows).
    - ``query_mask``: ``[B, P]``, multiplies the queries of the attention term only (text-guided
      inpainting: the pixel softmax of step 1 still runs over all pixels and step 4 is unmasked).
    - ``gamma_attn``, ``gamma_norm``: numbers, or ``[B]`` tensors of one step size per row (a batch of
      requests with different settings); a row with 0 gets no update of that term.
    """
    grad = torch.zeros_like(key)
    if nonzero(gamma_attn):
        if logits is None:
            if scale is None:
                raise ValueError("bcu_update needs either logits or scale")
            logits = attention_logits(query, key, heads, scale)
        # Step 1: softmax over the P pixels of S^T -> [B, H, N, P]. Softmax in float32 for half inputs.
        col = _upcast(logits.transpose(-1, -2)).softmax(dim=-1).to(query.dtype)
        q = query if query_mask is None else query * query_mask.unsqueeze(-1).to(query.dtype)
        # Step 2: A @ Q per head, heads concatenated back -> [B, N, H*d_h].
        g_attn = merge_heads(torch.matmul(col, split_heads(q, heads))) * _per_row(gamma_attn, query)
        if token_weights is not None:
            g_attn = g_attn * token_weights.unsqueeze(-1).to(g_attn.dtype)  # step 3
        grad = grad + g_attn
    if nonzero(gamma_norm):
        # Step 4: u = softmax over tokens of ||k_i||^2 (all heads together, no 1/2).
        u = _upcast(key).pow(2).sum(dim=-1).softmax(dim=-1).to(key.dtype)
        grad = grad - _per_row(gamma_norm, key) * u.unsqueeze(-1) * key
    # Step 5: chain rule through this layer's own W_k ([H*d_h, d_c]); the to_k bias plays no part.
    return torch.matmul(grad, to_k_weight.to(grad.dtype))


def nonzero(gamma: float | torch.Tensor) -> bool:
    return bool((gamma != 0).any()) if isinstance(gamma, torch.Tensor) else gamma != 0.0


def _per_row(gamma: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A number as it is; a ``[B]`` tensor as ``[B, 1, 1]`` (it scales each row's ``[N, d]`` term)."""
    if isinstance(gamma, torch.Tensor):
        return gamma.view(-1, 1, 1).to(like.device, like.dtype)
    return gamma
