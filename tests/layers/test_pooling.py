"""GeneralizedPooling against torch's own reductions and a naive per-channel loop."""
import math

import pytest
import torch

from cgd_heads import GeneralizedPooling, generalized_mean
from cgd_heads.layers import pooling
from cgd_heads.layers.pooling import P_LEARNABLE_RANGE


def naive_gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Loop over batch and channel in float64: (mean clamp(x, eps)^p)^(1/p)."""
    n, c = x.shape[:2]
    out = torch.empty(n, c, dtype=torch.float64)
    for i in range(n):
        for j in range(c):
            values = x[i, j].double().flatten().clamp(min=eps)
            out[i, j] = (values ** p).mean() ** (1.0 / p)
    return out


@pytest.mark.parametrize('hw', [(1, 1), (3, 5), (7, 7), (14, 14)])
class TestSpecialCases:
    def test_p1_is_average_pooling(self, hw):
        x = torch.randn(2, 6, *hw)  # negative values included: SPoC must not clamp
        out = GeneralizedPooling(p=1.0)(x)
        torch.testing.assert_close(out, x.mean(dim=(2, 3)))
        torch.testing.assert_close(out, torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    def test_inf_is_max_pooling_exactly(self, hw):
        x = torch.randn(2, 6, *hw)
        out = GeneralizedPooling(p=float('inf'))(x)
        assert torch.equal(out, x.amax(dim=(2, 3)))
        assert not torch.all(out == 1), 'MAC must not degenerate to all ones'

    def test_gem_matches_naive_loop(self, hw):
        x = torch.rand(2, 5, *hw) * 3
        torch.testing.assert_close(GeneralizedPooling(p=3.0)(x).double(), naive_gem(x, 3.0), rtol=1e-5, atol=1e-6)


def test_gem_clamps_negative_and_zero_maps():
    x = torch.zeros(2, 4, 5, 5)
    x[0, 0] = -3.0
    out = GeneralizedPooling(p=3.0, eps=1e-6)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, 1e-6))


@pytest.mark.parametrize('p', [6.0, 10.0, 20.0, 50.0])
def test_large_p_is_close_to_max_and_finite_for_large_activations(p):
    x = torch.rand(3, 8, 7, 7) * 1e4  # 1e4 ** 10 = 1e40 overflows float32 without rescaling
    out = GeneralizedPooling(p=p)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_gem(x, p), rtol=1e-4, atol=1e-3)
    mx = x.amax(dim=(2, 3))
    assert (out <= mx * (1 + 1e-6)).all()
    # GeM lies between the mean and the max, and approaches the max from below as p grows
    assert (out >= x.mean(dim=(2, 3))).all()
    assert ((mx - out) / mx).max() < 1 - (1 / 49) ** (1 / p) + 1e-4


def test_gem_is_monotone_in_p():
    x = torch.rand(2, 4, 6, 6)
    outs = [GeneralizedPooling(p=p)(x) for p in (1.0, 2.0, 3.0, 8.0, math.inf)]
    for lo, hi in zip(outs, outs[1:]):
        assert (lo <= hi + 1e-6).all()


def test_learnable_p_gets_gradient_and_is_parameter():
    pool = GeneralizedPooling(p=3.0, learnable=True)
    assert isinstance(pool.p, torch.nn.Parameter)
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fixed_p_is_buffer_in_state_dict():
    pool = GeneralizedPooling(p=4.0)
    assert 'p' in dict(pool.named_buffers()) and not list(pool.parameters())
    assert pool.state_dict()['p'].item() == 4.0


def test_gradient_matches_naive_reference():
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.tensor(3.5, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    ref_p = p.detach().clone().requires_grad_()
    generalized_mean(x.flatten(2), p, dim=2).sum().backward()
    (ref_x.clamp(min=1e-6) ** ref_p).mean(dim=(2, 3)).pow(1 / ref_p).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(p.grad, ref_p.grad)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, leaves) -> None:
    """``out == ref``, and after backpropagating one random gradient through both, each (ours, reference) leaf
    pair holds the same gradient."""
    torch.testing.assert_close(out, ref)
    grad_output = torch.randn_like(ref)
    out.backward(grad_output)
    ref.backward(grad_output)
    for ours, theirs in leaves:
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize('p', [0.5, 2.5, 3.0, 10.0])
@pytest.mark.parametrize('input_fmt', ['NCHW', 'NHWC'])
def test_fixed_p_kernel_value_and_gradient_match_the_formula(monkeypatch, p, input_fmt):
    # the hand-written backward of fixed-p GeM against autograd through the naive formula, in float64, with
    # activations below eps (clamped: zero gradient) and blocks of 2 images over a batch of 5 (ragged last block)
    monkeypatch.setattr(pooling, '_CPU_BLOCK_NUMEL', 2 * 3 * 4 * 5)
    x = torch.rand(5, 3, 4, 5, dtype=torch.float64) - 0.2
    x[0, 0] = 0.0  # a whole channel at zero: pooled to eps
    pool = GeneralizedPooling(p=p, input_fmt=input_fmt)
    ours = x.clone().requires_grad_()
    out = pool(ours if input_fmt == 'NCHW' else ours.permute(0, 2, 3, 1))
    ref_x = x.clone().requires_grad_()
    ref = (ref_x.clamp(min=1e-6) ** p).mean(dim=(2, 3)) ** (1 / p)
    assert_matches_reference(out, ref, [(ours, ref_x)])
    assert (ours.grad[x < 1e-6] == 0).all()


def test_fixed_p_kernel_gradcheck_and_half_precision():
    x = (torch.rand(3, 4, 6, dtype=torch.float64) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: GeneralizedPooling(p=3.0, input_fmt='NLC')(t), (x,))
    # bf16 in, bf16 gradient out, computed in float32: close to the float32 gradient
    x32 = (torch.rand(2, 8, 7, 7) * 10).requires_grad_()
    x16 = x32.detach().bfloat16().requires_grad_()
    GeneralizedPooling(p=3.0)(x32).sum().backward()
    GeneralizedPooling(p=3.0)(x16).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=2e-2, atol=1e-3)


def test_fixed_p_kernel_second_order_gradient_matches_the_formula():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.1
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(GeneralizedPooling(p=3.0)(ours).pow(2).sum(), ours, create_graph=True)
    (ref_grad,) = torch.autograd.grad(((ref.clamp(min=1e-6) ** 3).mean((2, 3)) ** (1 / 3)).pow(2).sum(), ref,
                                      create_graph=True)
    torch.testing.assert_close(grad, ref_grad)
    grad.pow(2).sum().backward()
    ref_grad.pow(2).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize('per_channel, input_fmt', [(False, 'NCHW'), (True, 'NCHW'), (True, 'NHWC')])
def test_learnable_p_kernel_gradients_match_the_formula(monkeypatch, per_channel, input_fmt):
    # d/dx and d/dp of the blocked kernel against autograd through the naive formula (float64, ragged blocks)
    monkeypatch.setattr(pooling, '_CPU_BLOCK_NUMEL', 2 * 3 * 4 * 5)
    x = torch.rand(5, 3, 4, 5, dtype=torch.float64) - 0.1
    pool = GeneralizedPooling(p=2.5, learnable=True, per_channel=per_channel, in_features=3,
                              input_fmt=input_fmt).double()
    with torch.no_grad():
        pool.p.copy_(torch.tensor([1.5, 2.5, 4.0]) if per_channel else torch.tensor(2.5))
    ref_p = pool.p.detach().clone().requires_grad_()
    ours = x.clone().requires_grad_()
    out = pool(ours if input_fmt == 'NCHW' else ours.permute(0, 2, 3, 1))
    ref_x = x.clone().requires_grad_()
    exponent = ref_p.view(-1, 1, 1)
    ref = (ref_x.clamp(min=1e-6) ** exponent).mean(dim=(2, 3)) ** (1 / ref_p)
    assert_matches_reference(out, ref, [(ours, ref_x), (pool.p, ref_p)])


def test_kernel_passes_gradcheck_and_gradgradcheck():
    x = (torch.rand(3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.tensor([[1.5], [2.0], [3.0], [6.0]], dtype=torch.float64, requires_grad=True)
    for args in ((x, 3.0), (x, p)):
        def fn(t, q=args[1]):
            return pooling._GeMFunction.apply(t, q, 2, 1e-6)
        assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(lambda t, q: pooling._GeMFunction.apply(t, q, 2, 1e-6), (x, p))


def test_mac_gradient_goes_to_the_maximum():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad_output = torch.randn(3, 4)
    GeneralizedPooling(p=math.inf)(x).backward(grad_output)
    expected = torch.zeros_like(x)
    for i in range(3):
        for j in range(4):
            h, w = divmod(int(x[i, j].argmax()), 5)
            expected[i, j, h, w] = grad_output[i, j]
    assert torch.equal(x.grad, expected)


def test_learnable_p_is_clamped_to_documented_range():
    pool = GeneralizedPooling(p=3.0, learnable=True)
    x = torch.rand(2, 4, 5, 5) + 0.5
    with torch.no_grad():
        pool.p.fill_(0.2)
    torch.testing.assert_close(pool(x), GeneralizedPooling(p=P_LEARNABLE_RANGE[0] + 1e-9)(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        pool.p.fill_(1e6)
    torch.testing.assert_close(pool(x).double(), naive_gem(x, P_LEARNABLE_RANGE[1]), rtol=1e-4, atol=1e-5)


def test_per_channel_p():
    pool = GeneralizedPooling(p=3.0, learnable=True, per_channel=True, in_features=4)
    assert pool.p.shape == (4,)
    with torch.no_grad():
        pool.p.copy_(torch.tensor([1.5, 2.0, 3.0, 7.0]))
    x = torch.rand(2, 4, 3, 5)
    out = pool(x)
    for c, p in enumerate([1.5, 2.0, 3.0, 7.0]):
        torch.testing.assert_close(out[:, c].double(), naive_gem(x[:, c:c + 1], p)[:, 0], rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (pool.p.grad.abs() > 0).all()


@pytest.mark.parametrize('p', [1.0, 3.0, math.inf])
def test_nhwc_and_nlc_match_nchw(p):
    x = torch.rand(2, 6, 3, 5)
    ref = GeneralizedPooling(p=p)(x)
    torch.testing.assert_close(GeneralizedPooling(p=p, input_fmt='NHWC')(x.permute(0, 2, 3, 1)), ref)
    torch.testing.assert_close(GeneralizedPooling(p=p, input_fmt='NLC')(x.flatten(2).transpose(1, 2)), ref)


def test_per_channel_nhwc_matches_nchw():
    a = GeneralizedPooling(p=3.0, learnable=True, per_channel=True, in_features=4)
    b = GeneralizedPooling(p=3.0, learnable=True, per_channel=True, in_features=4, input_fmt='NHWC')
    with torch.no_grad():
        a.p.copy_(torch.tensor([1.5, 2.0, 3.0, 7.0]))
        b.p.copy_(a.p)
    x = torch.rand(2, 4, 3, 3)
    torch.testing.assert_close(b(x.permute(0, 2, 3, 1)), a(x))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('p', [1.0, 3.0, 10.0, math.inf])
def test_autocast_is_finite_and_close_to_fp32(dtype, p):
    x = torch.rand(2, 8, 7, 7) * 100
    ref = GeneralizedPooling(p=p)(x)
    with torch.autocast('cpu', dtype=dtype):
        out = GeneralizedPooling(p=p)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_half_input_with_large_activations_stays_finite():
    x = (torch.rand(2, 4, 7, 7) * 1e4).half()  # x^3 alone would overflow fp16 (max 65504)
    out = GeneralizedPooling(p=3.0)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_gem(x.float(), 3.0), rtol=2e-3, atol=1.0)


@pytest.mark.parametrize('learnable', [True, False])
def test_eval_is_deterministic_and_compile_matches_eager(learnable):
    pool = GeneralizedPooling(p=3.0, learnable=learnable).eval()
    x = torch.rand(2, 8, 7, 7)
    assert torch.equal(pool(x), pool(x))
    compiled = torch.compile(pool, fullgraph=True)  # fixed p: the compiled graph takes the plain expression
    torch.testing.assert_close(compiled(x), pool(x))


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(p=0.0), ValueError, 'p must be > 0'), (dict(p=-1.0), ValueError, 'p must be > 0'),
    (dict(p=float('nan')), ValueError, 'p must be > 0'), (dict(p='3'), TypeError, 'p must be a float > 0'),
    (dict(p=float('inf'), learnable=True), ValueError, 'cannot be learnable'),
    (dict(eps=0.0), ValueError, 'eps must be a finite float > 0'),
    (dict(input_fmt='NCL'), ValueError, 'input_fmt must be one of'),
    (dict(per_channel=True, learnable=True), ValueError, 'per_channel=True needs in_features'),
    (dict(per_channel=True, in_features=4), ValueError, 'per_channel=True needs learnable=True'),
    (dict(in_features=0), ValueError, 'in_features must be a positive int'),
    (dict(p=0.5, learnable=True), ValueError, r'learnable p must start in \[1, 100\]'),
    (dict(p=200.0, learnable=True), ValueError, r'learnable p must start in \[1, 100\]'),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        GeneralizedPooling(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match='4-D NCHW'):
        GeneralizedPooling()(torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match='floating point'):
        GeneralizedPooling()(torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match='in_features=4'):
        GeneralizedPooling(learnable=True, per_channel=True, in_features=4)(torch.rand(2, 3, 4, 4))


def test_empty_batch_returns_empty():
    assert GeneralizedPooling()(torch.rand(0, 3, 4, 4)).shape == (0, 3)


def test_loading_a_fixed_p_updates_the_pooling():
    source, target = GeneralizedPooling(p=5.0), GeneralizedPooling(p=3.0)
    target.load_state_dict(source.state_dict())
    x = torch.rand(2, 4, 3, 3)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize('saved, expected', [(1.0, 'avg'), (float('inf'), 'max'), (5.0, 'gem')])
def test_loading_a_fixed_p_also_switches_the_variant(saved, expected):
    # a GeM module loaded with p = 1 must compute the plain mean (SPoC, no clamp), with p = inf the max
    target = GeneralizedPooling(p=3.0)
    target.load_state_dict(GeneralizedPooling(p=saved).state_dict())
    x = torch.randn(2, 4, 3, 3)  # negative activations: only the unclamped mean equals average pooling
    reference = {'avg': x.mean(dim=(2, 3)), 'max': x.amax(dim=(2, 3)),
                 'gem': x.clamp(min=1e-6).pow(5.0).mean(dim=(2, 3)).pow(1 / 5.0)}[expected]
    assert target.pool_type == expected
    torch.testing.assert_close(target(x), reference)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(eps='1e-6'), TypeError, 'eps'), (dict(eps=float('inf')), ValueError, 'eps'),
    (dict(in_features='8'), TypeError, 'in_features'), (dict(learnable=1), TypeError, 'learnable must be True or'),
    (dict(learnable=True, per_channel='yes', in_features=4), TypeError, 'per_channel'),
])
def test_constructor_arguments_of_the_wrong_type_or_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        GeneralizedPooling(**kwargs)


@pytest.mark.parametrize('p', [1.0, 3.0, math.inf])
def test_an_empty_map_is_refused_by_every_variant(p):
    # SPoC's mean of nothing would be a silent NaN, MAC's max an IndexError naming no argument
    for fmt, shape in (('NCHW', (2, 4, 0, 3)), ('NHWC', (2, 0, 0, 4)), ('NLC', (2, 0, 4))):
        with pytest.raises(ValueError, match='empty feature map'):
            GeneralizedPooling(p, input_fmt=fmt)(torch.zeros(shape))
