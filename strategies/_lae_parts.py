"""LAE pieces that are pure tensor arithmetic (internal): the EMA rule, the ensemble, PET parameter pairing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl.model import CLModel

__all__ = ["ema_update_", "max_softmax", "pet_pairs"]


@torch.no_grad()
def ema_update_(offline: list[Tensor], online: list[Tensor], decay: float) -> None:
    """``θ_off ← d · θ_off + (1 − d) · θ_on`` for every pair, in place, in one fused ``foreach`` call.

    The lerp form ``θ_off + (1 − d)(θ_on − θ_off)`` of timm's ``ModelEmaV2`` update (gqk/LAE ``main.py::
    post_train_step``); no Python loop over parameters.
    """
    if offline:
        torch._foreach_lerp_(offline, online, 1.0 - decay)


def max_softmax(*logits: Tensor) -> Tensor:
    """LAE's ensemble: the element-wise maximum of the experts' softmax vectors ``(B, C)`` (``MyModule.eval_epoch``)."""
    probs = [z.float().softmax(dim=-1) for z in logits]
    out = probs[0]
    for p in probs[1:]:
        out = torch.maximum(out, p)
    return out


def pet_pairs(model: CLModel, source: str, target: str) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of adapter set ``source`` and the matching ones of set ``target``, site by site.

    Raises ``ValueError`` if the two sets do not have the same sites, parameter names and shapes.
    """
    src: list[Tensor] = []
    dst: list[Tensor] = []
    for key, site in model.sites.items():
        if (source in site.adapters) != (target in site.adapters):
            raise ValueError(f"adapter sets {source} and {target} differ at site {key}")
        if source not in site.adapters:
            continue
        a: dict[str, nn.Parameter] = dict(site.adapters[source].named_parameters())
        b: dict[str, nn.Parameter] = dict(site.adapters[target].named_parameters())
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"adapter sets {source} and {target} have different parameters at site {key}")
        src += [a[k] for k in a]
        dst += [b[k] for k in a]
    return src, dst
