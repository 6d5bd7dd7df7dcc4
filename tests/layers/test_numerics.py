"""Numerics: property-based checks of pooling and head against naive references, and no NaN from degenerate data."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cgd_heads import CGDHead, CGDLoss, GeneralizedPooling, create_model

DTYPES = {'float32': (torch.float32, 1e-5), 'float64': (torch.float64, 1e-10), 'bfloat16': (torch.bfloat16, 2e-2),
          'float16': (torch.float16, 2e-3)}


def reference_pool(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Float64 formula per (n, c), from the definition (log-domain for large p, so it cannot overflow)."""
    x = x.double().flatten(2)
    if math.isinf(p):
        return x.amax(2)
    if p == 1.0:
        return x.mean(2)
    x = x.clamp(min=eps)
    return torch.exp(torch.logsumexp(p * x.log(), dim=2) / p - math.log(x.shape[2]) / p)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(1, 6),
       p=st.one_of(st.sampled_from([1.0, math.inf]), st.floats(0.5, 12.0)),
       scale=st.sampled_from([1e-3, 1.0, 100.0, 1e4]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2 ** 16))
def test_pooling_matches_reference(n, c, h, w, p, scale, dtype, seed):
    torch_dtype, rtol = DTYPES[dtype]
    if torch_dtype == torch.float16 and scale > 1e3:
        scale = 1e3  # activations must be representable in fp16 to begin with
    g = torch.Generator().manual_seed(seed)
    x = ((torch.rand(n, c, h, w, generator=g) - 0.2) * scale).to(torch_dtype)
    out = GeneralizedPooling(p=p)(x)
    assert out.dtype == torch_dtype and torch.isfinite(out).all()
    # the float64 formula rounded to the output dtype: eps = 1e-6 itself is a float16 subnormal (1.013e-6)
    ref = reference_pool(x, p).to(torch_dtype).double()
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-7 * scale)


@settings(max_examples=25, deadline=None)
@given(descriptors=st.sampled_from(['S', 'M', 'G', 'SG', 'MG', 'SMG', 'GMS']), c=st.integers(1, 8),
       h=st.integers(1, 5), w=st.integers(1, 5), combine=st.sampled_from(['concat', 'sum']),
       seed=st.integers(0, 2 ** 16))
def test_head_is_unit_norm_and_matches_reference(descriptors, c, h, w, combine, seed):
    torch.manual_seed(seed)
    head = CGDHead(c, descriptors, embed_dim=6 * len(descriptors), combine=combine).double()
    x = torch.rand(3, c, h, w, dtype=torch.float64) * 10
    out = head(x)
    parts = [F.normalize(reference_pool(x, {'S': 1.0, 'M': math.inf, 'G': 3.0}[d]) @ fc.weight.T, dim=1)
             for d, fc in zip(descriptors, head.fcs)]
    ref = F.normalize(torch.cat(parts, 1) if combine == 'concat' else sum(parts), dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_head_under_autocast_is_close_to_fp32(dtype):
    torch.manual_seed(0)
    head = CGDHead(64, 'SMG', embed_dim=48)
    x = torch.rand(4, 64, 7, 7) * 50
    ref = head(x)
    with torch.autocast('cpu', dtype=dtype):
        out = head(x.to(dtype))
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), ref).min() > 0.99


def test_all_zero_feature_maps_give_finite_embeddings_and_gradients():
    head = CGDHead(8, 'SMG', embed_dim=12, num_classes=3, learnable_p=True).train()
    x = torch.zeros(4, 8, 5, 5, requires_grad=True)
    emb, logits = head.forward_train(x)
    loss = CGDLoss(aux_loss=head.aux_head.loss)(emb, torch.tensor([0, 0, 1, 1]), logits)
    loss.backward()
    assert torch.isfinite(emb).all() and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize('labels', [[0, 0, 0, 0], [1, 1], [2, 2, 2, 2]])
def test_training_steps_on_degenerate_batches_keep_parameters_finite(labels):
    torch.manual_seed(0)
    model = create_model('test_resnet', descriptors='SG', embed_dim=16, num_classes=3, learnable_p=True).train()
    criterion = CGDLoss(aux_loss=model.head.aux_head.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.randn(len(labels), 3, 32, 32)
    images[:] = images[0]  # identical images as well: every distance is zero
    for _ in range(3):
        emb, logits = model.forward_train(images)
        loss = criterion(emb, torch.tensor(labels), logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
