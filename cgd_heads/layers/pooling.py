"""Generalised-mean (GeM) global pooling: SPoC (p = 1), MAC (p = inf) and GeM (any other p).

Radenovic, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation" (TPAMI 2018) define, for
a C x H x W feature map X,

    f_c = ( 1/|X_c| * sum_{x in X_c} x^p )^(1/p)

p = 1 is SPoC (average pooling), p -> inf is MAC (max pooling); CGD (Jun et al. 2019, arXiv 1903.10663) uses
all three as its global descriptors, with p = 3 for GeM.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from ..utils.checks import check_bool, check_float, check_int

__all__ = ['GeneralizedPooling', 'generalized_mean', 'INPUT_FORMATS', 'P_LEARNABLE_RANGE']

INPUT_FORMATS = ('NCHW', 'NHWC', 'NLC')

#: Range a learnable p is clamped to in the forward pass. Below 1 GeM drifts towards the geometric mean (weaker
#: than average pooling for retrieval); far above ~100 it is max pooling with a vanishing gradient on p.
P_LEARNABLE_RANGE = (1.0, 100.0)


def generalized_mean(x: torch.Tensor, p: Union[torch.Tensor, float], dim: int, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean of ``clamp(x, eps)`` along ``dim``: ``(mean(clamp(x, eps)^p))^(1/p)``.

    The power is taken in float32 (float64 stays float64) after dividing by the per-vector maximum m:
    ``m * (mean((x / m)^p))^(1/p)`` equals the formula exactly (the mean is homogeneous of degree one) but never
    overflows, so activations of 1e4 with p = 10 (1e40 > float32 max) or fp16/bf16 inputs stay finite. m is
    detached: the expression equals GeM for any constant m, so the gradient is still exactly GeM's.

    Args:
        x: Input tensor, any shape.
        p: Finite exponent > 0, a float or a tensor broadcastable against ``x`` with ``dim`` reduced-to-1.
        dim: Dimension to reduce.
        eps: Lower clamp of the activations; keeps the power and its gradient finite for zero or negative inputs.

    Returns:
        The reduced tensor (``dim`` removed) in ``x``'s dtype.
    """
    in_dtype = x.dtype
    compute_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    x = x.to(compute_dtype)
    scale = x.detach().amax(dim=dim, keepdim=True).clamp(min=eps)
    # clamp(x, eps) / m computed as clamp(x / m, eps / m): one full-size temporary fewer (memory-bound on CPU)
    ratio = (x / scale).clamp_(min=eps / scale)
    if isinstance(p, torch.Tensor):
        p = p.to(compute_dtype)
    pooled = ratio.pow(p).mean(dim=dim, keepdim=True).pow(1.0 / p) * scale
    return pooled.squeeze(dim).to(in_dtype)


#: Elements per block of :class:`_GeMFunction` on the CPU (4 MB of float32). A fresh temporary the size of a whole
#: (32, 2048, 14, 14) map is 51 MB, and the page faults of first touching it cost more than the arithmetic on it;
#: a block-sized temporary is reused from the allocator and stays in cache.
_CPU_BLOCK_NUMEL = 1 << 20


def _use_gem_kernel(x: torch.Tensor) -> bool:
    """Whether :class:`_GeMFunction` may run: not while tracing or compiling (its Python loop over blocks would be
    unrolled with the example's batch size, and the compilers fuse the plain expression anyway), not on empty maps."""
    return x.numel() > 0 and not (torch.jit.is_tracing() or torch.compiler.is_compiling())


class _GeMFunction(torch.autograd.Function):
    """GeM over ``dim`` of a 3-D map with a hand-written backward, computed block by block over dim 0.

    Same value as :func:`generalized_mean` (the same max-scaled expression per block). With ``c = clamp(x, eps)``,
    ``f = (mean_j c_j^p)^(1/p)`` and n = ``x.shape[dim]``, the backward uses

        d f / d x_j = (1/n) (c_j / f)^(p - 1) [x_j >= eps]
        d f / d p   = f * ( mean_j(r_j^p ln r_j) / (p s) - ln(s) / p^2 ),   r = c / max_j c_j,  s = mean_j r_j^p

    in place on one buffer per block: autograd through the composite expression keeps and revisits five full-size
    temporaries, which made GeM's forward + backward 3-4x slower on a ResNet-50 map. ``c / f <= n^(1/p)`` and
    ``s >= 1/n``, so nothing overflows or takes the log of zero. ``p`` is a float (fixed) or a tensor broadcastable
    against the map with ``dim`` reduced to 1 (learnable, possibly per channel). Under ``create_graph=True`` the
    backward differentiates the composite expression instead, so higher-order gradients stay exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Union[torch.Tensor, float], dim: int,  # type: ignore[override]
                eps: float) -> torch.Tensor:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        p_input = p if isinstance(p, torch.Tensor) else None
        if p_input is not None:
            p = p_input.detach().to(compute_dtype)
        reduced = list(x.shape)
        reduced[dim] = 1
        pooled = torch.empty(reduced, dtype=compute_dtype, device=x.device)
        buffer = None
        for rows in _blocks(x):
            block = x[rows]
            scale = block.amax(dim=dim, keepdim=True).to(compute_dtype).clamp_(min=eps)
            buffer = _block_buffer(buffer, block, compute_dtype)
            ratio = torch.div(block, scale, out=buffer[:block.shape[0]]).clamp_(min=eps / scale)
            torch.mean(_pow_positive_(ratio, p), dim=dim, keepdim=True, out=pooled[rows])
            pooled[rows].pow_(1.0 / p).mul_(scale)
        ctx.save_for_backward(x, pooled, p_input)
        ctx.p, ctx.dim, ctx.eps = p, dim, eps
        return pooled.squeeze(dim).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        x, pooled, p_input = ctx.saved_tensors
        p, dim, eps = ctx.p, ctx.dim, ctx.eps
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the composite expression, which autograd can differentiate again
            needs = [t for t, need in zip((x, p_input), ctx.needs_input_grad[:2]) if need]
            value = generalized_mean(x, p if p_input is None else p_input, dim=dim, eps=eps)
            grads = iter(torch.autograd.grad(value, needs, grad_output, create_graph=True))
            return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2]) + (None, None)
        coefficient = grad_output.to(pooled.dtype).unsqueeze(dim) / x.shape[dim]
        grad_input = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_p = torch.zeros_like(p_input) if ctx.needs_input_grad[1] else None
        in_place = grad_input is not None and grad_input.dtype == pooled.dtype  # else computed in float32, cast
        buffer = log_buffer = None
        for rows in _blocks(x):
            block = x[rows]
            if grad_input is not None:
                if in_place:
                    grad = torch.clamp(block, min=eps, out=grad_input[rows])
                else:
                    buffer = _block_buffer(buffer, block, pooled.dtype)
                    grad = buffer[:block.shape[0]].copy_(block).clamp_(min=eps)
                grad = _pow_positive_(grad.div_(pooled[rows]), p - 1.0)
                # clamp's gradient: zero below eps (torch's convention, x >= eps passes)
                grad.mul_(coefficient[rows]).masked_fill_(block < eps, 0.0)
                if not in_place:
                    grad_input[rows] = grad
            if grad_p is not None:
                buffer = _block_buffer(buffer, block, pooled.dtype)
                log_buffer = _block_buffer(log_buffer, block, pooled.dtype)
                scale = block.amax(dim=dim, keepdim=True).to(pooled.dtype).clamp_(min=eps)
                ratio = torch.div(block, scale, out=buffer[:block.shape[0]]).clamp_(min=eps / scale)
                log_ratio = torch.log(ratio, out=log_buffer[:block.shape[0]])
                powered = torch.mul(log_ratio, p, out=ratio).exp_()  # r^p
                s = powered.mean(dim=dim, keepdim=True)
                weighted = powered.mul_(log_ratio).mean(dim=dim, keepdim=True)
                d_pooled_d_p = pooled[rows] * (weighted / (p * s) - s.log() / (p * p))
                grad_p += (d_pooled_d_p * coefficient[rows] * x.shape[dim]).sum_to_size(grad_p.shape)
        return grad_input, grad_p, None, None


#: Exponents torch's pow computes with a dedicated vectorised kernel (square, cube, sqrt); any other p takes a
#: scalar std::pow per element on the CPU, ~2x slower than exp(p * log(t)).
_FAST_EXPONENTS = (1.0, 2.0, 3.0, 0.5)


def _pow_positive_(t: torch.Tensor, exponent: Union[torch.Tensor, float]) -> torch.Tensor:
    """``t ** exponent`` in place, for ``t > 0``."""
    if isinstance(exponent, float) and exponent in _FAST_EXPONENTS:
        return t.pow_(exponent)
    return t.log_().mul_(exponent).exp_()


def _blocks(x: torch.Tensor):
    """Slices of dim 0 covering ``x`` in blocks of about ``_CPU_BLOCK_NUMEL`` elements (one block off the CPU)."""
    per_row = max(1, x[0].numel())
    step = max(1, _CPU_BLOCK_NUMEL // per_row) if x.device.type == 'cpu' else x.shape[0]
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


def _block_buffer(buffer: Optional[torch.Tensor], block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``dtype`` buffer with room for ``block``, reused across blocks (only the first block allocates)."""
    if buffer is None:
        buffer = torch.empty(block.shape, dtype=dtype, device=block.device)
    return buffer


def check_p(p: float, learnable: bool, name: str = 'p') -> float:
    """``p`` as a float if it is a valid GeM exponent: > 0 (``inf`` = MAC) when fixed; when learnable, finite and
    inside :data:`P_LEARNABLE_RANGE` (outside it the forward's clamp would give p a zero gradient from the first step,
    so it would never move).

    Raises:
        TypeError: ``p`` is not a number.
        ValueError: ``p`` is out of range.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f'{name} must be a float > 0 (or float("inf") for MAC), got {type(p).__name__} {p!r}')
    p = float(p)
    if math.isnan(p) or p <= 0:
        raise ValueError(f'{name} must be > 0 (1 = SPoC/average, 3 = GeM, float("inf") = MAC/max), got {p}')
    if learnable and math.isinf(p):
        raise ValueError(f'{name}=inf (MAC) cannot be learnable: pass a finite initial p, or learnable=False for MAC')
    low, high = P_LEARNABLE_RANGE
    if learnable and not low <= p <= high:
        raise ValueError(f'a learnable {name} must start in [{low:g}, {high:g}] (the range the forward pass clamps '
                         f'it to: outside it p gets no gradient), got {p:g}')
    return p


def _fixed_pool_type(p: float) -> str:
    """The exact special case a fixed p computes: 'max' (MAC) for inf, 'avg' (SPoC) for 1, else 'gem'."""
    return 'max' if math.isinf(p) else 'avg' if p == 1.0 else 'gem'


class GeneralizedPooling(nn.Module):
    """Global generalised-mean pooling (GeM), with SPoC and MAC as its exact special cases.

    ``f_c = (mean_{h,w} clamp(x_{c,h,w}, eps)^p)^(1/p)``

    * ``p = 1``, fixed: SPoC, computed as a plain ``mean`` (no clamp: equals average pooling exactly, also for
      negative activations).
    * ``p = float('inf')``: MAC, computed as ``amax`` (never as ``pow(inf)``, which returns all ones).
    * otherwise GeM, computed in float32 with max-scaling (see :func:`generalized_mean`), safe under fp16/bf16
      autocast and for large p. Activations below ``eps`` (zeros, negatives) are clamped to ``eps``. Eager calls
      run a kernel with a hand-written backward over cache-sized blocks (several times faster than autograd
      through the plain expression on the CPU, see ``benchmarks/results/speed.md``); traced or compiled graphs
      get the plain expression.

    The variant is chosen once here from ``p`` and ``learnable``, not re-decided per call. A learnable p is an
    ``nn.Parameter``, a fixed p a buffer (so it follows ``.to()`` and lands in the state dict). A learnable p is
    clamped to :data:`P_LEARNABLE_RANGE` ``[1, 100]`` in the forward pass: the stored value may step outside,
    the value used never does, and its gradient is zero while it stays outside.

    Args:
        p: Exponent, > 0; ``float('inf')`` for MAC.
        learnable: Learn p (GeM only).
        eps: Activation clamp for GeM, > 0.
        per_channel: Learn one p per channel (requires ``in_features``).
        in_features: Number of channels C; required for ``per_channel``, checked against the input when given.
        input_fmt: ``'NCHW'`` (CNN maps), ``'NHWC'`` (channels-last maps, e.g. Swin) or ``'NLC'`` (token
            sequences; drop prefix tokens before pooling).

    Shape:
        Input ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, L, C)`` by ``input_fmt``; output ``(N, C)``.

    Example:
        >>> pool = GeneralizedPooling(p=3.0, learnable=True)
        >>> pool(torch.rand(2, 8, 7, 7)).shape
        torch.Size([2, 8])
    """

    def __init__(
            self,
            p: float = 3.0,
            learnable: bool = False,
            eps: float = 1e-6,
            per_channel: bool = False,
            in_features: Optional[int] = None,
            input_fmt: str = 'NCHW',
    ):
        super().__init__()
        learnable = check_bool(learnable, 'learnable')
        per_channel = check_bool(per_channel, 'per_channel')
        p = check_p(p, learnable)
        eps = check_float(eps, 'eps', minimum=0, above=True)
        if input_fmt not in INPUT_FORMATS:
            raise ValueError(f'input_fmt must be one of {INPUT_FORMATS}, got {input_fmt!r}')
        in_features = check_int(in_features, 'in_features', allow_none=True)
        if per_channel and in_features is None:
            raise ValueError('per_channel=True needs in_features (the channel count C) to size the p vector')
        if per_channel and not learnable:
            raise ValueError('per_channel=True needs learnable=True (a fixed p is the same for every channel)')
        self.eps = float(eps)
        self.learnable = learnable
        self.per_channel = per_channel
        self.in_features = in_features
        self.input_fmt = input_fmt
        # NCHW reduces the last (flattened H*W) axis; NHWC/NLC reduce axis 1 with channels last.
        self._channels_first = input_fmt == 'NCHW'
        if learnable:
            self.pool_type = 'gem'
            shape = (in_features,) if per_channel else ()
            self.p = nn.Parameter(torch.full(shape, p))
        else:
            self.pool_type = _fixed_pool_type(p)
            # inf is stored as is: the buffer documents the variant, the forward never raises anything to it
            self.register_buffer('p', torch.tensor(p))
        self._p_float = p  # fixed p as a Python float: pow(x, 3.0) is ~2x faster than pow(x, tensor(3.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.learnable:  # keep the float copy and the variant in step with a loaded buffer
            self._p_float = check_p(float(self.p), learnable=False)
            self.pool_type = _fixed_pool_type(self._p_float)

    def extra_repr(self) -> str:
        """The settings ``print(module)`` shows: variant, p, whether p is learnt, input format."""
        p = self.p if self.p.ndim == 0 else f'[{self.p.numel()} channels]'
        return f'pool_type={self.pool_type}, p={p}, learnable={self.learnable}, input_fmt={self.input_fmt}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a floating-point feature map laid out as ``input_fmt`` over its spatial (or token) axis.

        Args:
            x: ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, L, C)``, by ``input_fmt``.

        Returns:
            The pooled ``(N, C)`` tensor in ``x``'s dtype (GeM is computed in float32 and cast back).

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x`` has the wrong number of dimensions, or not ``in_features`` channels when that was
                given.
        """
        if not x.is_floating_point():
            raise TypeError(f'GeneralizedPooling expects a floating point feature map, got dtype {x.dtype}')
        if x.ndim != (4 if self.input_fmt != 'NLC' else 3):
            raise ValueError(
                f'GeneralizedPooling(input_fmt={self.input_fmt!r}) expects a '
                f'{"3-D (N, L, C)" if self.input_fmt == "NLC" else "4-D " + self.input_fmt} tensor, '
                f'got shape {tuple(x.shape)}')
        if self._channels_first:
            x = x.flatten(2)  # (N, C, H*W)
            dim = 2
        else:
            x = x.flatten(1, -2) if x.ndim == 4 else x  # (N, H*W or L, C)
            dim = 1
        if x.shape[dim] == 0:  # the mean would be NaN and the max raise an IndexError
            raise ValueError(f'GeneralizedPooling got an empty feature map of shape {tuple(x.shape)} '
                             f'({self.input_fmt}): no positions to pool (is the input image smaller than the '
                             f"backbone's total stride?)")
        if self.in_features is not None and x.shape[1 if self._channels_first else 2] != self.in_features:
            raise ValueError(
                f'GeneralizedPooling was built for in_features={self.in_features} channels, got input of shape '
                f'{tuple(x.shape)} ({self.input_fmt})')
        if self.pool_type == 'max':
            if torch.is_grad_enabled() and x.requires_grad:
                # max's backward scatters into one zero tensor; amax's compares, counts and divides at full size
                # (4x slower). Ties then send the gradient to one maximal position instead of sharing it.
                return x.max(dim=dim).values
            return x.amax(dim=dim)
        if self.pool_type == 'avg':
            return x.mean(dim=dim)
        if not self.learnable:
            p: Union[torch.Tensor, float] = self._p_float
        else:
            p = self.p.clamp(*P_LEARNABLE_RANGE)
            if self.per_channel and self._channels_first:
                p = p.unsqueeze(-1)  # (C, 1) broadcasts over (N, C, H*W)
        if _use_gem_kernel(x):
            return _GeMFunction.apply(x, p, dim, self.eps)
        return generalized_mean(x, p, dim=dim, eps=self.eps)
