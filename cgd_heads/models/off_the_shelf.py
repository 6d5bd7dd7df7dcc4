"""Off-the-shelf retrieval: a pretrained backbone's features pooled and L2-normalised, with no training at all.

This is the reference a fine-tuning run has to beat on the user's own data: if a trained CGD model does not beat
its backbone's pooled ImageNet features on held-out classes, the run is not worth keeping (on generic objects such
as Caltech-101 the pretrained features are already strong, see ``docs/training.md``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.pooling import GeneralizedPooling
from ..utils.checks import PathLike
from .backbone import BackboneFeatures, create_backbone

__all__ = ['OffTheShelfModel', 'create_off_the_shelf']


class OffTheShelfModel(nn.Module):
    """A backbone's feature map pooled with GeM and L2-normalised: ``f(x) = GeM_p(F(x)) / ||GeM_p(F(x))||_2``.

    ``F`` is the backbone's ``forward_features``; ``p = 1`` is SPoC (average pooling), ``p = inf`` MAC (max
    pooling). Token outputs (ViTs) drop their prefix (class / register) tokens before pooling.

    Args:
        backbone: A timm model whose ``forward_features`` returns one map (or token sequence).
        features: The layout of that output (:func:`~cgd_heads.models.create_backbone` returns it).
        p: Exponent of the pooling, > 0 (``float('inf')`` for MAC).
        config: What the model was built from (kept as ``.config``, as a CGDModel keeps its own).

    Shape:
        Input ``(N, 3, H, W)``, output ``(N, C)`` with ``C = features.channels``.
    """

    def __init__(self, backbone: nn.Module, features: BackboneFeatures, p: float = 3.0,
                 config: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.backbone = backbone
        self.pool = GeneralizedPooling(p=p, input_fmt=features.input_fmt)
        self.num_prefix_tokens = features.num_prefix_tokens
        self.config = dict(config or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` -> unit-length pooled features ``(N, C)``."""
        out = self.backbone.forward_features(x)
        if self.num_prefix_tokens:
            out = out[:, self.num_prefix_tokens:]
        return F.normalize(self.pool(out), dim=1)


def create_off_the_shelf(
        model_name: str,
        p: float = 3.0,
        pretrained: bool = False,
        stride_mode: Optional[str] = None,
        checkpoint_path: Optional[PathLike] = None,
        pretrained_from: Optional[str] = None,
        **timm_kwargs: Any,
) -> OffTheShelfModel:
    """Build a timm backbone with its pretrained weights and pool it without a head (:class:`OffTheShelfModel`).

    Args:
        model_name: Any timm model name.
        p: Pooling exponent: 1 (SPoC / GAP), 3 (GeM, the usual off-the-shelf choice) or ``float('inf')`` (MAC).
        pretrained: timm's pretrained weights (needs the hub).
        stride_mode: None (default: the backbone as trained on ImageNet), ``'strip'`` or ``'dilate'`` (as
            :func:`~cgd_heads.create_model`; a fine-tuned CGD model strips it, so compare with both).
        checkpoint_path: Local backbone weights (a timm state dict); a whole CGDModel's state dict is refused.
        pretrained_from: A pip package that ships ImageNet weights for this backbone (offline).
        **timm_kwargs: Passed to ``timm.create_model``.

    Raises:
        ValueError: If ``checkpoint_path`` holds a CGDModel (evaluate that one's checkpoint folder instead), or as
            :func:`~cgd_heads.models.create_backbone` raises.
    """
    backbone, features, model_state = create_backbone(model_name, pretrained, stride_mode, checkpoint_path,
                                                      pretrained_from, **timm_kwargs)
    if model_state is not None:
        raise ValueError(f'checkpoint_path={str(checkpoint_path)!r} holds a whole CGDModel (backbone.* / head.* keys), '
                         'not backbone weights: evaluate the trained model itself (cgd-eval --checkpoint)')
    config = dict(model_name=model_name, p=p, stride_mode=features.stride_mode, off_the_shelf=True)
    return OffTheShelfModel(backbone, features, p, config).eval()
