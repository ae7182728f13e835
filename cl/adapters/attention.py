"""Explicit-softmax attention for timm ViT blocks: the one place where timm's attention arithmetic is rewritten.

Prefix tuning with LAE's adaptation-speed calibration needs the attention *probabilities*, which timm's fused
``scaled_dot_product_attention`` path does not expose. :func:`explicit_attention` recomputes a timm
``Attention`` module's forward from its own submodules (``qkv``, ``q_norm``/``k_norm``, ``attn_drop``, ``norm``,
``gate``, ``proj``, ``proj_drop``; no weights are copied), optionally with prefix key/value tokens inserted at
``position`` and the prefix columns renormalised (:func:`compensate_prefix`). With no prefix it equals timm's own
forward to float tolerance (tested on ``test_vit``, ViT-S/16, ViT-B/16 and DINOv2-S/14 blocks).

Reference: Q. Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient Tuning",
ICCV 2023, arXiv 2303.10070, §3.3; official code gqk/LAE ``libml/model/backbone/vit.py::Attention.forward`` and
``libml/model/pet/prefix.py::Prefix.compensate``.

Deviations: for timm models with q/k normalisation (none of LAE's backbones), prefix keys are inserted *after*
``k_norm`` (learned directly in the normalised key space).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from timm.models.vision_transformer import Attention

__all__ = ["ATTENTION_PARTS", "compensate_prefix", "explicit_attention", "missing_attention_parts"]

#: submodules/attributes of a timm ``Attention`` the explicit computation needs
ATTENTION_PARTS = ("qkv", "num_heads", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def missing_attention_parts(attn: nn.Module) -> list[str]:
    """The parts of :data:`ATTENTION_PARTS` that ``attn`` lacks (empty for timm's ``Attention``)."""
    missing = [p for p in ATTENTION_PARTS if not hasattr(attn, p)]
    if not missing and not isinstance(attn.qkv, nn.Linear):
        missing.append("qkv (an nn.Linear)")
    return missing


def compensate_prefix(attn: Tensor, start: int, length: int) -> Tensor:
    """LAE's calibration: divide the prefix columns ``[start, start + length)`` of every row by their sum λ.

    Args:
        attn: attention probabilities ``(..., N_keys)`` (rows sum to 1).
        start / length: position and number of the prefix keys.

    Returns:
        The same shape; the prefix part of each row sums to 1, the rest is unchanged (it sums to 1 − λ). The row
        then gives ``(1 − λ) · Attn_orig + Attn_prefix`` instead of ``(1 − λ) · Attn_orig + λ · Attn_prefix``.
    """
    stop = start + length
    lam = attn[..., start:stop].sum(dim=-1, keepdim=True)
    return torch.cat([attn[..., :start], attn[..., start:stop] / lam.clamp(min=1e-12), attn[..., stop:]], dim=-1)


def explicit_attention(attn: Attention | nn.Module, x: Tensor, prefix: tuple[Tensor, Tensor] | None = None,
                       position: int = 1, compensate: bool = True) -> Tensor:
    """timm ``Attention.forward`` with an explicit softmax and optional prefix keys/values.

    Args:
        attn: a timm ``Attention`` module (its own weights are used; hooks on its submodules, e.g. LoRA on
            ``qkv``, still run).
        x: tokens ``(B, N, C)``.
        prefix: key and value tokens ``(L, attn_dim)`` each (already scaled), or ``None``.
        position: index in the key/value sequence where the prefix goes (LAE: 1, after the CLS token).
        compensate: renormalise the prefix attention mass to 1 per row (:func:`compensate_prefix`).

    Returns:
        ``(B, N, C_out)``; the query sequence and the output length are unchanged.
    """
    attn = cast("Attention", attn)
    bsz, n, _ = x.shape
    heads = int(attn.num_heads)
    attn_dim = attn.qkv.out_features // 3
    head_dim = attn_dim // heads
    gate_mod: nn.Module | None = getattr(attn, "gate", None)  # timm >= 1.0.20
    gate = gate_mod(x).sigmoid() if gate_mod is not None else None
    qkv = attn.qkv(x).reshape(bsz, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    length = 0
    if prefix is not None:
        pk, pv = prefix
        length = pk.shape[0]
        pk = pk.to(k.dtype).reshape(length, heads, head_dim).transpose(0, 1).expand(bsz, -1, -1, -1)  # (B, H, L, Dh)
        pv = pv.to(v.dtype).reshape(length, heads, head_dim).transpose(0, 1).expand(bsz, -1, -1, -1)
        k = torch.cat([k[:, :, :position], pk, k[:, :, position:]], dim=2)
        v = torch.cat([v[:, :, :position], pv, v[:, :, position:]], dim=2)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N + L)
    probs = attn.attn_drop(probs)
    if prefix is not None and compensate:
        probs = compensate_prefix(probs, position, length)
    out = (probs @ v).transpose(1, 2).reshape(bsz, n, attn_dim)
    norm: nn.Module | None = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
