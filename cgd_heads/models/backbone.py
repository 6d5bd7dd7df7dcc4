"""The backbone half of :func:`cgd_heads.create_model`: a timm model with its weights, its last stride removed, and
the layout of the features it gives the head."""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict

from ..utils.checks import PathLike
from .stride import STRIDE_MODES, default_input_size, strip_last_stride, trace_forward
from .weights import load_pip_weights

__all__ = ['BackboneFeatures', 'create_backbone', 'load_state_dict_strict']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneFeatures:
    """What the head needs to know of a backbone's ``forward_features`` output."""
    channels: int  #: C, the head's ``in_features``
    input_fmt: str  #: 'NCHW', 'NHWC' or 'NLC' (tokens)
    num_prefix_tokens: int  #: class / register tokens of an NLC output, excluded from pooling
    stride_mode: Optional[str]  #: the stride change actually applied (None for token backbones)


def check_model_name(model_name: str) -> None:
    """Raise TypeError/ValueError (with close matches) unless ``model_name`` is a timm model."""
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f'model_name must be a timm model name such as "resnet50", got {model_name!r}')
    if not timm.is_model(model_name.split('.')[0]):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean {close}?' if close else '; see timm.list_models()'
        raise ValueError(f'model_name={model_name!r} is not a timm model{hint}')


def load_state_dict_strict(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, what: str, hint: str,
                           ignore: Tuple[str, ...] = ()) -> None:
    """Strictly load ``state_dict``; keys under the ``ignore`` prefixes may be extra. Mismatches -> ValueError."""
    own = module.state_dict()
    unexpected = [k for k in state_dict if k not in own and not any(k == i or k.startswith(i + '.') for i in ignore)]
    missing = [k for k in own if k not in state_dict]
    shapes = [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f'{source} does not match {what}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:5]}. '
            f'{hint}')
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own})


def _classifier_prefixes(backbone: nn.Module) -> Tuple[str, ...]:
    names = (getattr(backbone, 'pretrained_cfg', None) or {}).get('classifier') or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _build_timm_model(model_name: str, pretrained: bool, stride_mode: Optional[str],
                      timm_kwargs: Dict[str, Any]) -> Tuple[nn.Module, bool]:
    """Build the timm backbone; returns (backbone, already_dilated by timm's output_stride=16)."""
    kwargs = dict(timm_kwargs, pretrained=pretrained, num_classes=0)
    if stride_mode == 'dilate':
        try:
            backbone = timm.create_model(model_name, output_stride=16, **kwargs)
        except (TypeError, AssertionError, ValueError, NotImplementedError) as e:
            _logger.info('%s does not support output_stride=16 (%s); dilating generically', model_name, e)
        else:
            size = default_input_size(backbone)
            _, out = trace_forward(backbone, size)
            if out.ndim == 4 and size[-1] / out.shape[-1] == 16:
                return backbone, True
            _logger.info('%s ignored output_stride=16; dilating generically', model_name)
    try:
        return timm.create_model(model_name, **kwargs), False
    except RuntimeError as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f'could not load pretrained weights for {model_name!r} ({e}). Offline, pass checkpoint_path= a local '
            f'timm state dict of this architecture instead of pretrained=True.') from e


def _load_backbone_weights(backbone: nn.Module, model_name: str, pretrained_from: Optional[str],
                           checkpoint_path: Optional[PathLike]) -> Optional[Dict[str, torch.Tensor]]:
    """Load a pip package's or a local file's backbone weights; a whole-CGDModel state dict is returned instead."""
    name = type(backbone).__name__
    if pretrained_from is not None:
        load_state_dict_strict(backbone, load_pip_weights(pretrained_from, backbone, model_name),
                               f'pretrained_from={pretrained_from!r}', f'the backbone {name}',
                               'The weights package does not fit this model.', ignore=_classifier_prefixes(backbone))
    if checkpoint_path is None:
        return None
    state_dict = load_state_dict(str(checkpoint_path), use_ema=False)
    if any(k.startswith('backbone.') for k in state_dict):
        return state_dict  # keys of a whole CGDModel: loaded once the head exists
    load_state_dict_strict(backbone, state_dict, f'checkpoint_path={str(checkpoint_path)!r}', f'the backbone {name}',
                           'Pass a state dict of the same timm architecture (or a CGDModel checkpoint).',
                           ignore=_classifier_prefixes(backbone))
    return None


def _check_single_map(model_name: str, out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.ndim in (3, 4):
        return
    found = (f'a {type(out).__name__} of {len(out)}' if isinstance(out, (list, tuple)) else
             f'shape {tuple(out.shape)}' if isinstance(out, torch.Tensor) else type(out).__name__)
    why = ('multi-branch models such as CrossViT or CoaT are not supported' if isinstance(out, (list, tuple))
           else 'a backbone that already pools its features has nothing left for CGD to pool'
           if isinstance(out, torch.Tensor) and out.ndim == 2 else 'this output cannot be pooled')
    raise ValueError(
        f'model_name={model_name!r}: its forward_features returns {found}, not one feature map (N, C, H, W) / '
        f'(N, H, W, C) or token sequence (N, L, C); CGD pools a single map, so {why}. Wrap the backbone so it '
        f'returns one such tensor and use CGDHead directly.')


def create_backbone(
        model_name: str,
        pretrained: bool = False,
        stride_mode: Optional[str] = 'strip',
        checkpoint_path: Optional[PathLike] = None,
        pretrained_from: Optional[str] = None,
        **timm_kwargs: Any,
) -> Tuple[nn.Module, BackboneFeatures, Optional[Dict[str, torch.Tensor]]]:
    """Build ``timm.create_model(model_name, num_classes=0, **timm_kwargs)``, load its weights, strip its stride.

    Arguments as :func:`cgd_heads.create_model`. Returns the backbone, the layout of its features, and the state
    dict of a whole CGDModel when ``checkpoint_path`` holds one (to load once the head exists), else None.
    """
    check_model_name(model_name)
    if stride_mode not in STRIDE_MODES + (None,):
        raise ValueError(f'stride_mode must be one of {STRIDE_MODES + (None,)}, got {stride_mode!r}')
    if 'output_stride' in timm_kwargs and stride_mode is not None:
        # timm's output_stride already dilates the last stage(s); stripping on top would remove a second step
        raise ValueError(f'output_stride={timm_kwargs["output_stride"]!r} (timm\'s own dilation) with '
                         f'stride_mode={stride_mode!r} would change the stride twice: pass stride_mode=None to keep '
                         f'timm\'s output_stride, or leave output_stride out (stride_mode=\'dilate\' is output '
                         f'stride 16)')
    if pretrained_from is not None and (pretrained or checkpoint_path is not None):
        raise ValueError('pretrained_from cannot be combined with pretrained=True or checkpoint_path: pick one source')
    backbone, dilated_by_timm = _build_timm_model(model_name, pretrained, stride_mode, timm_kwargs)
    model_state = _load_backbone_weights(backbone, model_name, pretrained_from, checkpoint_path)
    input_size = default_input_size(backbone)
    _, out = trace_forward(backbone, input_size, keep_list=True)
    _check_single_map(model_name, out)
    if out.ndim == 3:
        if stride_mode is not None:
            _logger.warning('%s returns tokens %s: no downsampling to strip, stride_mode=%r ignored',
                            model_name, tuple(out.shape), stride_mode)
        features = BackboneFeatures(int(out.shape[-1]), 'NLC', int(getattr(backbone, 'num_prefix_tokens', 0)), None)
        return backbone, features, model_state
    if stride_mode is not None and not dilated_by_timm:
        strip_last_stride(backbone, stride_mode, input_size=input_size)
    input_fmt = getattr(backbone, 'output_fmt', 'NCHW')
    input_fmt = input_fmt if input_fmt in ('NCHW', 'NHWC') else 'NCHW'
    channels = out.shape[1] if input_fmt == 'NCHW' else out.shape[-1]
    return backbone, BackboneFeatures(int(channels), input_fmt, 0, stride_mode), model_state
