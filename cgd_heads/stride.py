"""Remove the last downsampling step of a CNN so its final feature map doubles (CGD: 7x7 -> 14x14 at 224 px).

CGD removes the downsampling between stage 3 and stage 4 of its ResNet-50 backbone "to preserve more information in
the last feature map". This module does that for any timm CNN from the model's own structure, not a table of
model names: one traced forward pass records, for every strided convolution and pooling layer, the spatial size of
its input and output; the layers whose output already has the final size and whose stride is 2 form the last
downsampling step (the main path and the shortcut alike). Those are changed in place:

* ``'strip'`` (the paper): stride 1, with padding that keeps the size exact. Odd kernels get symmetric padding;
  even kernels (ConvNeXt's 2x2 downsampling conv, DenseNet's or ResNet-D's 2x2 average pool) have no symmetric
  'same' padding, so convolutions use ``padding='same'`` and poolings get a replicate pad on the right/bottom.
* ``'dilate'``: the same, plus the dilation of every later spatial (k > 1) convolution is doubled, which keeps the
  receptive field that pretrained weights were trained with (the DeepLab trick; timm's ``output_stride=16``).

Only strides, paddings and dilations change (no parameter or buffer is touched), and a second traced forward pass
checks that the final map doubled exactly; if not, every change is undone and a ValueError explains why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import BlurPool2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

__all__ = ['strip_last_stride', 'feature_map_size', 'STRIDE_MODES']

_logger = logging.getLogger(__name__)

STRIDE_MODES = ('strip', 'dilate')
# Layers that compute their own 'same' padding from their stride at call time: setting stride 1 is enough.
_DYNAMIC_PAD = (Conv2dSame, AvgPool2dSame, MaxPool2dSame, BlurPool2d)
_SPATIAL_OPS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, BlurPool2d)


@dataclass
class _Call:
    name: str
    module: nn.Module
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]


def _pair(v: Any) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size') or (3, 224, 224)
    return tuple(int(s) for s in size)


def _forward_features(model: nn.Module, x: torch.Tensor, keep_list: bool = False) -> Any:
    out = model.forward_features(x) if hasattr(model, 'forward_features') else model(x)
    if isinstance(out, (list, tuple)) and not keep_list:  # features_only models return one map per stage
        out = out[-1]
    return out


def _trace(model: nn.Module, input_size: Tuple[int, int, int], keep_list: bool = False) -> Tuple[List[_Call], Any]:
    """Run one eval-mode forward pass and record the in/out size of every conv/pool call.

    The output is the model's final feature map; ``keep_list=True`` returns a list/tuple output as it is.
    """
    calls: List[_Call] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4 and isinstance(out, torch.Tensor):
            calls.append(_Call(names.get(module, '?'), module, tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _SPATIAL_OPS)]
    try:
        model.eval()
        with torch.no_grad():
            out = _forward_features(model, torch.zeros((1, *input_size), device=device, dtype=dtype), keep_list)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls, out


def _spatial_hw(model: nn.Module, out: torch.Tensor) -> Optional[Tuple[int, int]]:
    if out.ndim != 4:
        return None
    if getattr(model, 'output_fmt', 'NCHW') == 'NHWC':
        return tuple(out.shape[1:3])
    return tuple(out.shape[-2:])


def feature_map_size(model: nn.Module, input_size: Optional[Tuple[int, int, int]] = None) -> Tuple[int, ...]:
    """Shape of ``model.forward_features`` for one image of ``input_size`` (C, H, W; default: pretrained_cfg)."""
    _, out = _trace(model, input_size or _default_input_size(model))
    return tuple(out.shape[1:])


def _same_padding(kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[Any, bool]:
    """Padding that keeps the size at stride 1; returns (padding, symmetric)."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), True
    return 'same', False


class _Reverter:
    """Remembers every attribute set and module replaced, so a failed strip leaves the model as it was."""

    def __init__(self) -> None:
        self._attrs: List[Tuple[nn.Module, str, Any]] = []
        self._modules: List[Tuple[nn.Module, str, nn.Module]] = []

    def set(self, module: nn.Module, **attrs: Any) -> None:
        for key, value in attrs.items():
            self._attrs.append((module, key, getattr(module, key)))
            setattr(module, key, value)

    def replace(self, model: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        self._modules.append((parent, child, getattr(parent, child)))
        setattr(parent, child, new)

    def undo(self) -> None:
        for parent, child, old in reversed(self._modules):
            setattr(parent, child, old)
        for module, key, old in reversed(self._attrs):
            setattr(module, key, old)


def _set_conv_padding(rev: _Reverter, conv: nn.Conv2d, dilation: Tuple[int, int]) -> None:
    if isinstance(conv, Conv2dSame):
        return
    padding, _ = _same_padding(_pair(conv.kernel_size), dilation)
    rev.set(conv, padding=padding)
    if conv.padding_mode != 'zeros':
        # nn.Conv2d pads non-zero modes itself from this precomputed (left, right, top, bottom) list.
        pads: List[int] = []
        for k, d in zip(reversed(_pair(conv.kernel_size)), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        rev.set(conv, _reversed_padding_repeated_twice=pads)


def _strip_one(rev: _Reverter, model: nn.Module, call: _Call) -> None:
    m = call.module
    if isinstance(m, _DYNAMIC_PAD):
        rev.set(m, stride=1 if isinstance(m, BlurPool2d) else (1, 1))
    elif isinstance(m, nn.Conv2d):
        rev.set(m, stride=(1, 1))
        _set_conv_padding(rev, m, _pair(m.dilation))
    else:  # nn.MaxPool2d / nn.AvgPool2d
        kernel = _pair(m.kernel_size)
        dilation = _pair(getattr(m, 'dilation', 1))
        padding, symmetric = _same_padding(kernel, dilation)
        if symmetric:
            rev.set(m, stride=1, padding=padding, ceil_mode=False)
        else:
            # No symmetric padding keeps the size of an even kernel: pad right/bottom by replication (neutral
            # for max, and for average it repeats the border instead of diluting it with zeros).
            rev.set(m, stride=1, padding=0, ceil_mode=False)
            (th, tw) = (d * (k - 1) for k, d in zip(kernel, dilation))
            pad = nn.ReplicationPad2d((tw // 2, tw - tw // 2, th // 2, th - th // 2))
            rev.replace(model, call.name, nn.Sequential(pad, m))


def _dilate_following(rev: _Reverter, calls: List[_Call], final_hw: Tuple[int, int], stripped: set) -> int:
    count = 0
    for call in calls:
        m = call.module
        if not isinstance(m, nn.Conv2d) or m in stripped or call.in_hw != final_hw:
            continue
        if all(k == 1 for k in _pair(m.kernel_size)):
            continue
        dilation = tuple(2 * d for d in _pair(m.dilation))
        rev.set(m, dilation=dilation)
        _set_conv_padding(rev, m, dilation)
        stripped.add(m)  # a module called twice is dilated once
        count += 1
    return count


def _update_feature_info(model: nn.Module) -> None:
    info = getattr(model, 'feature_info', None)
    entries = [e for e in info if isinstance(e, dict) and 'reduction' in e] if isinstance(info, list) else []
    if not entries:
        return
    # Nominal reductions (32, not 224 / 7 measured on an odd input): every entry at the last level halves.
    last = max(e['reduction'] for e in entries)
    for entry in entries:
        if entry['reduction'] == last:
            entry['reduction'] = last // 2


def strip_last_stride(
        model: nn.Module,
        mode: str = 'strip',
        input_size: Optional[Tuple[int, int, int]] = None,
) -> nn.Module:
    """Remove the last downsampling step of a CNN in place, doubling its final feature map.

    Args:
        model: A timm CNN (anything with ``forward_features`` returning an NCHW map, or whose ``forward`` does).
        mode: ``'strip'``: stride 1 (CGD's way). ``'dilate'``: stride 1 and dilation 2 in the later convolutions
            (keeps pretrained receptive fields).
        input_size: (C, H, W) of the traced dummy input; default the model's ``pretrained_cfg['input_size']``.

    Returns:
        The same model, modified in place; ``feature_info`` entries of the last level report half the reduction
        (32 -> 16).

    Raises:
        ValueError: ``mode`` is invalid, the model has no spatial map (a plain ViT returns tokens: nothing to
            strip), or its last downsampling is not done by strided conv/pool layers (e.g. patch merging by
            reshaping), so the final map would not become the map that entered the last step (twice the size for
            even sizes); the model is left unchanged.

    Example:
        >>> backbone = timm.create_model('resnet50', pretrained=False, num_classes=0, global_pool='')
        >>> strip_last_stride(backbone)  # a 224 px image now gives a 14x14 map instead of 7x7
    """
    if mode not in STRIDE_MODES:
        raise ValueError(f'mode must be one of {STRIDE_MODES}, got {mode!r}')
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    input_size = tuple(input_size) if input_size is not None else _default_input_size(model)
    cls = type(model).__name__
    try:
        calls, out = _trace(model, input_size)
    except Exception as e:  # the model's own error, e.g. a shape mismatch deep inside
        raise ValueError(f'{cls}: a forward pass of one {input_size} image failed ({type(e).__name__}: {e}); '
                         f'strip_last_stride needs an image model, and input_size= if it expects another size') from e
    final_hw = _spatial_hw(model, out)
    if final_hw is None:
        raise ValueError(
            f'{cls} returns features of shape {tuple(out.shape)} (tokens, not a spatial map): there is no '
            f'downsampling to strip. Use stride_mode=None; CGDHead pools tokens with input_fmt="NLC".')
    last_step = [c for c in calls if c.out_hw == final_hw and c.in_hw != final_hw
                 and max(_pair(getattr(c.module, 'stride', 1))) > 1]
    if not last_step:
        raise ValueError(
            f'{cls}: no strided convolution or pooling layer produces the final {final_hw[0]}x{final_hw[1]} map, '
            f'so its last downsampling cannot be stripped (it is done some other way, e.g. patch merging). '
            f'Use stride_mode=None.')
    bad = [c.name for c in last_step if _pair(c.module.stride) != (2, 2)]
    if bad:
        raise ValueError(f'{cls}: the last downsampling layers {bad} do not have stride 2; only stride-2 steps '
                         f'can be stripped. Use stride_mode=None.')

    rev = _Reverter()
    stripped = {c.module for c in last_step}
    for call in {id(c.module): c for c in last_step}.values():
        _strip_one(rev, model, call)
    dilated = _dilate_following(rev, calls, final_hw, stripped) if mode == 'dilate' else 0
    try:
        _, new_out = _trace(model, input_size)
        new_hw = _spatial_hw(model, new_out)
    except Exception as e:  # a layer could not run at the new stride: undo rather than leave a broken model
        rev.undo()
        raise ValueError(f'{cls}: stripping the last stride broke the forward pass ({e}); model left unchanged. '
                         f'Use stride_mode=None.') from e
    # The final map must now have the resolution that entered the last step: twice the old one for even sizes
    # (14 -> 7 -> 14), and e.g. 11 where an odd 11 had been downsampled to 6.
    expected = max(c.in_hw for c in last_step)
    if new_hw != expected:
        rev.undo()
        raise ValueError(
            f'{cls}: after stripping {[c.name for c in last_step]} the final map is {new_hw}, not the {expected} that '
            f'entered the last downsampling step: some of that step is done outside strided conv/pool layers. '
            f'Model left unchanged; use stride_mode=None.')
    _update_feature_info(model)
    _logger.info('%s: stripped the last stride (%s) at %s%s; final map %s -> %s', cls, mode,
                 [c.name for c in last_step], f', dilated {dilated} convs' if dilated else '', final_hw, new_hw)
    return model
