"""Cut a timm backbone into a frozen trunk and a trainable tail: ``tail(trunk(x)) == forward_features(x)``.

Partial fine-tuning trains only the last stage(s) of a pretrained network: the trunk's maps can then be computed
once and cached (see :func:`cgd_heads.training.cached_feature_maps`), and each training step runs only the tail and
the head. The cut works on backbones whose ``forward_features`` is a plain chain of their children (e.g. ResNets,
EfficientNets, ConvNeXts); stages are the items of a ``blocks`` / ``stages`` / ``layers`` container or the
``layer1``.. ``layerN`` (``s1``.. ``sN``) children. The chain is checked against ``forward_features`` on a probe
input, so a backbone that does more than chain its children (a ViT adds position embeddings between them) is
refused instead of silently cut wrong.
"""
from __future__ import annotations

import re
from typing import List, Tuple

import torch
import torch.nn as nn

from .stride import default_input_size

__all__ = ['split_backbone']

#: children of a timm model that belong to its classifier, not to forward_features
_HEAD_NAMES = ('global_pool', 'head', 'head_drop', 'fc', 'classifier', 'fc_norm', 'pre_logits', 'flatten')
#: containers whose items are the stages
_STAGE_CONTAINERS = ('blocks', 'stages', 'layers')


def _chain(backbone: nn.Module) -> Tuple[List[nn.Module], List[int]]:
    """The modules forward_features chains, and the positions in it where each stage starts."""
    chain: List[nn.Module] = []
    stage_starts: List[int] = []
    for name, child in backbone.named_children():
        if name in _HEAD_NAMES:
            continue
        if name in _STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            for item in child:
                stage_starts.append(len(chain))
                chain.append(item)
            continue
        if re.fullmatch(r'(layer|s)\d+', name):
            stage_starts.append(len(chain))
        chain.append(child)
    return chain, stage_starts


@torch.no_grad()
def split_backbone(backbone: nn.Module, trainable_stages: int = 1) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, tail)``: the tail is the last ``trainable_stages`` stages and every layer after them.

    Args:
        backbone: A timm backbone (e.g. ``create_model(...).backbone``, stride already stripped); its modules are
            shared with the returned halves, not copied.
        trainable_stages: Stages in the tail, 1 to the number of stages minus one (the trunk keeps at least the
            first stage).

    Returns:
        Two ``nn.Sequential`` such that ``tail(trunk(x))`` equals ``backbone.forward_features(x)``.

    Raises:
        TypeError: ``trainable_stages`` is not an int.
        ValueError: ``trainable_stages`` out of range, or the backbone's forward_features is not a plain chain of
            its children.
    """
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int):
        raise TypeError(f'trainable_stages must be an int, got {trainable_stages!r}')
    chain, starts = _chain(backbone)
    name = type(backbone).__name__
    if len(starts) < 2:
        raise ValueError(f'{name} has no stages to split at (found {len(starts)} in its blocks / stages / layers / '
                         f'layerN children)')
    if not 1 <= trainable_stages < len(starts):
        raise ValueError(f'trainable_stages must be between 1 and {len(starts) - 1} for {name} ({len(starts)} '
                         f'stages), got {trainable_stages}')
    cut = starts[-trainable_stages]
    trunk, tail = nn.Sequential(*chain[:cut]), nn.Sequential(*chain[cut:])
    was_training = backbone.training
    backbone.eval()
    channels, height, width = default_input_size(backbone)
    # a small probe keeps the check cheap for large models (every CNN of timm takes 128 px)
    probe = torch.randn(1, channels, min(height, 128), min(width, 128), device=next(backbone.parameters()).device)
    problem = None
    try:
        expected = backbone.forward_features(probe)
        got = tail(trunk(probe))
        if not isinstance(expected, torch.Tensor) or got.shape != expected.shape or \
                not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            problem = 'the chained halves do not reproduce it'
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, AssertionError) as e:
        # AssertionError: timm's _assert on input sizes (fixed-size ViTs / Swins at the capped probe size)
        problem = f'chaining its children fails: {type(e).__name__}: {e}'
    finally:
        backbone.train(was_training)
    if problem:
        raise ValueError(f"{name}'s forward_features is not a plain chain of its children ({problem}), so it cannot "
                         f'be split for partial fine-tuning')
    return trunk, tail
