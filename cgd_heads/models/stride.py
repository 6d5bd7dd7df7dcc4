"""Remove the last downsampling step of a CNN so its final feature map doubles (CGD: 7x7 -> 14x14 at 224 px).

CGD removes the downsampling between stage 3 and stage 4 of its ResNet-50 backbone "to preserve more information in
the last feature map". This module does that for any timm backbone from the model's own structure, not a table of
model names. One traced forward pass records the spatial size entering and leaving every strided convolution and
pooling layer; the stride-2 layers whose output already has the final size form the last downsampling step (the
main path and the shortcut alike). Those are changed in place:

* ``'strip'`` (the paper): stride 1 and the layer's own padding, plus the right/bottom padding that makes the
  output exactly twice what it was, at every input size: none for the usual 3x3 conv on an even map, one pixel for
  even kernels (ConvNeXt's 2x2 downsampling conv, DenseNet's or ResNet-D's 2x2 average pool: 7 -> 14, not 13), for
  odd maps, and for Inception's unpadded 3x3 on an odd map (17 -> 8 -> 16). It is zeros for convolutions (as their
  own padding) and a replicated border for poolings (neutral for max; average repeats the border instead of
  diluting it), added by a forward pre-hook that reads the input size at call time.
* ``'dilate'``: the same, plus the dilation of every later spatial (k > 1) convolution is doubled, which keeps the
  receptive field that pretrained weights were trained with (the DeepLab trick; timm's ``output_stride=16``, which
  it matches exactly except where a shortcut average-pools: timm pads that pool with zeros, this module replicates
  the border, so e.g. ResNet-D's last row and column differ slightly).

When the last step is not done by strided conv/pool layers alone (Swin's patch merging reshapes 2x2 neighbours
into channels, an Inception block pools with ``F.max_pool2d``, HaloNet's attention subsamples its queries), the
module that halves the map is run densely instead, by shift-and-stitch (Long et al., FCN 2015): its input,
padded by one pixel on the right/bottom, is shifted by (0, 0), (0, 1), (1, 0), (1, 1), the four copies go through
the module as one batch, and the four outputs are interleaved. For a translation-equivariant module this is the
module at stride 1 away from the border (a shifted copy meets the module's own padding one pixel later), for 4x
that module's cost (the same as a stride-1 convolution); batch statistics (BatchNorm in training mode) are taken
over the four copies. It is done with forward hooks, so the module, its class and its state-dict keys stay as
they were.

Only strides, paddings, dilations and hooks change (no parameter or buffer is touched), and a second traced forward
pass checks that the final map doubled exactly; if not, every change is undone and a ValueError explains why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BlurPool2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

__all__ = ['strip_last_stride', 'feature_map_size', 'STRIDE_MODES', 'default_input_size', 'trace_forward']

_logger = logging.getLogger(__name__)

STRIDE_MODES = ('strip', 'dilate')
# Layers that compute their own padding from their stride (timm's 'same' layers) or pad themselves (BlurPool2d).
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


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size') or (3, 224, 224)
    return tuple(int(s) for s in size)


def _forward_features(model: nn.Module, x: torch.Tensor, keep_list: bool = False) -> Any:
    out = model.forward_features(x) if hasattr(model, 'forward_features') else model(x)
    if isinstance(out, (list, tuple)) and not keep_list:  # features_only models return one map per stage
        out = out[-1]
    return out


def trace_forward(model: nn.Module, input_size: Tuple[int, int, int],
                  keep_list: bool = False) -> Tuple[List[_Call], Any]:
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
    _, out = trace_forward(model, input_size or default_input_size(model))
    return tuple(out.shape[1:])


def _same_padding(kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Any:
    """Padding that keeps the size at stride 1: symmetric where it exists, else torch's 'same'."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals)
    return 'same'


class _DoubleOutput:
    """Forward pre-hook of a layer set to stride 1: pads the input on the right/bottom so that the output has exactly
    twice the size the layer had at stride 2, for whatever input size it is called with.

    At stride 2 a layer with kernel k, dilation d and padding p maps H to o = floor((L - 1) / 2) + 1 (ceil with
    ``ceil_mode``), L = H + 2 p - d (k - 1); at stride 1 it maps H to L, so 2 o - L pixels (0 or 1; 2 for some
    ``ceil_mode`` pools) are added. 'Same'-padding layers (timm's Conv2dSame, ...) map H to ceil(H / 2) and then H.
    """

    def __init__(self, kernel: Optional[Tuple[int, int]], dilation: Tuple[int, int], padding: Tuple[int, int],
                 ceil_mode: bool, mode: str) -> None:
        self.kernel, self.dilation, self.padding, self.ceil_mode, self.mode = kernel, dilation, padding, ceil_mode, mode

    def extra(self, size: int, axis: int) -> int:
        if self.kernel is None:  # 'same' padding
            return size % 2
        p = self.padding[axis]
        length = size + 2 * p - self.dilation[axis] * (self.kernel[axis] - 1)
        out = (length // 2 if self.ceil_mode else (length - 1) // 2) + 1
        if self.ceil_mode and (out - 1) * 2 >= size + p:  # torch drops a last window that starts in the padding
            out -= 1
        return 2 * out - length

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        x = args[0]
        h, w = (self.extra(int(x.shape[-2]), 0), self.extra(int(x.shape[-1]), 1))
        if not (h or w):
            return None
        return (F.pad(x, (0, w, 0, h), mode=self.mode), *args[1:])


class _ShiftIn:
    """Forward pre-hook of shift-and-stitch: the input shifted by (0, 0), (0, 1), (1, 0), (1, 1) as one batch."""

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = args[0].permute(0, 3, 1, 2) if self.channels_last else args[0]
        h, w = x.shape[-2:]
        # The right/bottom pixel is replicated so every shifted copy keeps the full size.
        padded = F.pad(x, (0, 1, 0, 1), mode='replicate')
        x = torch.cat([padded[..., a:a + h, b:b + w] for a in (0, 1) for b in (0, 1)])
        return (x.permute(0, 2, 3, 1) if self.channels_last else x, *args[1:])


class _StitchOut:
    """Forward hook of shift-and-stitch: interleaves the four outputs, output[2i + a, 2j + b] = out_ab[i, j]."""

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        n = out.shape[0] // 4
        if self.channels_last:
            _, h, w, c = out.shape
            return out.reshape(2, 2, n, h, w, c).permute(2, 3, 0, 4, 1, 5).reshape(n, 2 * h, 2 * w, c)
        _, c, h, w = out.shape
        return out.reshape(2, 2, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, 2 * h, 2 * w)


class _Reverter:
    """Remembers every attribute set and hook added, so a failed strip leaves the model as it was."""

    def __init__(self) -> None:
        self._attrs: List[Tuple[nn.Module, str, Any]] = []
        self._hooks: List[Any] = []

    def set(self, module: nn.Module, **attrs: Any) -> None:
        for key, value in attrs.items():
            self._attrs.append((module, key, getattr(module, key)))
            setattr(module, key, value)

    def pre_hook(self, module: nn.Module, hook: Any) -> None:
        self._hooks.append(module.register_forward_pre_hook(hook))

    def hook(self, module: nn.Module, hook: Any) -> None:
        self._hooks.append(module.register_forward_hook(hook))

    def undo(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        for module, key, old in reversed(self._attrs):
            setattr(module, key, old)


def _set_conv_padding(rev: _Reverter, conv: nn.Conv2d, dilation: Tuple[int, int]) -> None:
    if isinstance(conv, Conv2dSame):
        return
    padding = _same_padding(_pair(conv.kernel_size), dilation)
    rev.set(conv, padding=padding)
    if conv.padding_mode != 'zeros':
        # nn.Conv2d pads non-zero modes itself from this precomputed (left, right, top, bottom) list.
        pads: List[int] = []
        for k, d in zip(reversed(_pair(conv.kernel_size)), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        rev.set(conv, _reversed_padding_repeated_twice=pads)


def _strip_one(rev: _Reverter, call: _Call) -> None:
    """Stride 1, the layer's own padding, and a right/bottom pad that makes its output exactly twice the old one."""
    m = call.module
    if isinstance(m, BlurPool2d):  # pads k // 2 itself (reflect), then a k x k blur
        rev.set(m, stride=1)
        hook = _DoubleOutput(_pair(m.filt_size), (1, 1), _pair(m.padding[0]), False, 'replicate')
    elif isinstance(m, _DYNAMIC_PAD):  # compute 'same' padding from their stride at call time
        rev.set(m, stride=(1, 1))
        hook = _DoubleOutput(None, (1, 1), (0, 0), False, 'constant' if isinstance(m, Conv2dSame) else 'replicate')
    else:
        kernel, dilation, padding = (_pair(getattr(m, a, 1)) for a in ('kernel_size', 'dilation', 'padding'))
        ceil_mode = bool(getattr(m, 'ceil_mode', False))  # read before it is switched off
        if isinstance(m, nn.Conv2d):
            rev.set(m, stride=(1, 1))
            mode = 'constant' if m.padding_mode == 'zeros' else 'replicate'
        else:
            rev.set(m, stride=1, ceil_mode=False)
            # replication is neutral for max, and for average it repeats the border instead of diluting it
            mode = 'replicate'
        hook = _DoubleOutput(kernel, dilation, padding, ceil_mode, mode)
    rev.pre_hook(m, hook)


@dataclass
class _Plan:
    """One way to remove the last step: leaf layers to set to stride 1, modules to run by shift-and-stitch."""
    what: str
    leaves: List[_Call]
    stitched: List[Tuple[str, nn.Module, bool]]  # (name, module, channels_last)


def _trace_modules(model: nn.Module, input_size: Tuple[int, int, int]) -> List[Tuple[str, nn.Module, tuple, tuple]]:
    """(name, module, input shape, output shape) of every module call that maps a 4-D tensor to a 4-D tensor."""
    calls: List[Tuple[str, nn.Module, tuple, tuple]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4 and isinstance(out, torch.Tensor) \
                and out.ndim == 4:
            calls.append((names.get(module, '?'), module, tuple(args[0].shape), tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        trace_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return calls


def _halving_format(in_shape: tuple, out_shape: tuple, final_hw: Tuple[int, int]) -> Optional[bool]:
    """channels_last (True/False) if the call maps a map of up to twice the final size to the final map, else None."""
    for channels_last, dims in ((False, (2, 3)), (True, (1, 2))):
        i = tuple(in_shape[d] for d in dims)
        o = tuple(out_shape[d] for d in dims)
        if o == final_hw and in_shape[0] == out_shape[0] and all(f < a <= 2 * f + 2 for a, f in zip(i, final_hw)):
            return channels_last
    return None


def _module_plans(model: nn.Module, input_size: Tuple[int, int, int], final_hw: Tuple[int, int],
                  calls: List[_Call]) -> List[_Plan]:
    """Plans for a last step that strided leaves alone do not make: the innermost modules that halve the map
    (leaves among them set to stride 1, the others stitched), then the smallest module holding all of them."""
    halving: Dict[str, Tuple[nn.Module, bool]] = {}
    for name, module, in_shape, out_shape in _trace_modules(model, input_size):
        channels_last = _halving_format(in_shape, out_shape, final_hw)
        if channels_last is not None and name not in halving:
            halving[name] = (module, channels_last)
    if not halving:
        return []

    def inside(name: str, parent: str) -> bool:
        return name.startswith(parent + '.')

    innermost = [n for n in halving if not any(inside(other, n) for other in halving)]
    leaves, stitched = [], []
    for name in innermost:
        module, channels_last = halving[name]
        if isinstance(module, _SPATIAL_OPS) and _pair(getattr(module, 'stride', 1)) == (2, 2) and not channels_last:
            leaves.append(name)
        else:
            stitched.append((name, module, channels_last))
    plans = []
    leaf_calls = [c for c in calls if c.name in leaves]  # the conv/pool calls of the first trace
    if stitched:
        plans.append(_Plan(f'stitched {[n for n, _, _ in stitched]}' + (f', stride 1 {leaves}' if leaves else ''),
                           list({id(c.module): c for c in leaf_calls}.values()), stitched))
    common = [n for n in halving if all(inside(i, n) for i in innermost)]
    if common:  # the deepest module that holds every innermost one
        name = max(common, key=lambda n: n.count('.'))
        plans.append(_Plan(f'stitched [{name!r}]', [], [(name, *halving[name])]))
    return plans


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


def _apply(model: nn.Module, plan: _Plan, mode: str, calls: List[_Call], final_hw: Tuple[int, int],
           input_size: Tuple[int, int, int]) -> Tuple[Optional[_Reverter], str]:
    """Carry out one plan and check the final map doubled; returns (changes, '') or (None, why it failed)."""
    rev = _Reverter()
    target = (2 * final_hw[0], 2 * final_hw[1])
    try:
        for call in plan.leaves:
            _strip_one(rev, call)
        for _, module, channels_last in plan.stitched:
            rev.pre_hook(module, _ShiftIn(channels_last))
            rev.hook(module, _StitchOut(channels_last))
        dilated = 0
        if mode == 'dilate':
            # convolutions inside a stitched module still run at its (strided) resolution: not dilated
            inner = {m for _, module, _ in plan.stitched for m in module.modules()}
            dilated = _dilate_following(rev, calls, final_hw, {c.module for c in plan.leaves} | inner)
        _, new_out = trace_forward(model, input_size)
        new_hw = _spatial_hw(model, new_out)
    except Exception as e:  # a layer could not run at the new stride: undo rather than leave a broken model
        rev.undo()
        return None, f'{plan.what}: the forward pass broke ({type(e).__name__}: {str(e)[:160]})'
    if new_hw != target:
        rev.undo()
        return None, f'{plan.what}: the final map became {new_hw}, not {target}'
    return rev, f'{plan.what}' + (f', dilated {dilated} convs' if dilated else '')


def _plans(model: nn.Module, input_size: Tuple[int, int, int], final_hw: Tuple[int, int], calls: List[_Call],
           failures: List[str]) -> Iterator[_Plan]:
    """The ways to remove the last step, in the order :func:`strip_last_stride` tries them (see there); a way that
    cannot apply adds its reason to ``failures``. Lazy: the module plans cost a second trace, taken only when every
    leaf plan failed."""
    last_step = [c for c in calls if c.out_hw == final_hw and c.in_hw != final_hw
                 and max(_pair(getattr(c.module, 'stride', 1))) > 1]
    larger = [i for i, c in enumerate(calls) if c.out_hw[0] > final_hw[0] or c.out_hw[1] > final_hw[1]]
    after = [c for i, c in enumerate(calls) if c in last_step and (not larger or i > larger[-1])]
    tried: List[set] = []
    for what, group in (('stride 1', last_step), ('stride 1 after the last larger map', after)):
        group = list({id(c.module): c for c in group}.values())
        modules = {id(c.module) for c in group}
        if not group or modules in tried:  # the second group adds nothing when it is the first one again
            continue
        tried.append(modules)
        bad = [c.name for c in group if _pair(c.module.stride) != (2, 2)]
        if bad:
            failures.append(f'{what} {[c.name for c in group]}: {bad} do not have stride 2')
            continue
        yield _Plan(f'{what} {[c.name for c in group]}', group, [])
    if not last_step:
        failures.append(f'no strided convolution or pooling layer produces the final {final_hw[0]}x{final_hw[1]} map')
    module_plans = _module_plans(model, input_size, final_hw, calls)
    if not module_plans:
        failures.append('no enclosing module halves the map either')
    yield from module_plans


def strip_last_stride(
        model: nn.Module,
        mode: str = 'strip',
        input_size: Optional[Tuple[int, int, int]] = None,
) -> nn.Module:
    """Remove the last downsampling step of a backbone in place, doubling its final feature map exactly.

    Tried in order, each checked by a traced forward pass and undone if the map does not double: (1) the stride-2
    conv/pool layers that produce the final map, (2) only those of them that run after the last larger map (so a
    spatial-reduction attention's strided conv of an earlier stage, e.g. PVT-v2's, is left alone), (3) the innermost
    modules that halve the map, stitched when they are not strided leaves (patch merging, strided attention),
    (4) the smallest module holding all of those, stitched (an Inception block that pools functionally).

    Args:
        model: A timm backbone whose ``forward_features`` returns a spatial map, NCHW or NHWC (``output_fmt``).
        mode: ``'strip'``: stride 1 (CGD's way). ``'dilate'``: stride 1 and dilation 2 in the later convolutions
            (keeps pretrained receptive fields).
        input_size: (C, H, W) of the traced dummy input; default the model's ``pretrained_cfg['input_size']``.

    Returns:
        The same model, modified in place; ``feature_info`` entries of the last level report half the reduction
        (32 -> 16).

    Raises:
        ValueError: ``mode`` is invalid, the model has no spatial map (a plain ViT returns tokens: nothing to
            strip), or no plan doubles the final map (e.g. position embeddings or attention biases of a fixed
            size after the last step); the model is left unchanged.

    Example:
        >>> backbone = timm.create_model('resnet50', pretrained=False, num_classes=0, global_pool='')
        >>> strip_last_stride(backbone)  # a 224 px image now gives a 14x14 map instead of 7x7
    """
    if mode not in STRIDE_MODES:
        raise ValueError(f'mode must be one of {STRIDE_MODES}, got {mode!r}')
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    cls = type(model).__name__
    try:
        calls, out = trace_forward(model, input_size)
    except Exception as e:  # the model's own error, e.g. a shape mismatch deep inside
        raise ValueError(f'{cls}: a forward pass of one {input_size} image failed ({type(e).__name__}: {e}); '
                         f'strip_last_stride needs an image model, and input_size= if it expects another size') from e
    final_hw = _spatial_hw(model, out)
    if final_hw is None:
        raise ValueError(
            f'{cls} returns features of shape {tuple(out.shape)} (tokens, not a spatial map): there is no '
            f'downsampling to strip. Use stride_mode=None; CGDHead pools tokens with input_fmt="NLC".')

    failures: List[str] = []
    for plan in _plans(model, input_size, final_hw, calls, failures):
        rev, note = _apply(model, plan, mode, calls, final_hw, input_size)
        if rev is not None:
            break
        failures.append(note)
    else:
        raise ValueError(f'{cls}: cannot double the final {final_hw[0]}x{final_hw[1]} map: ' + '; '.join(failures)
                         + '; model left unchanged, use stride_mode=None.')
    _update_feature_info(model)
    _logger.info('%s: stripped the last stride (%s): %s; final map %s -> %s', cls, mode, note, final_hw,
                 (2 * final_hw[0], 2 * final_hw[1]))
    return model
