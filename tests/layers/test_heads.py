"""CGDHead and AuxSoftmaxHead against a naive re-computation from their weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from cgd_heads import AuxSoftmaxHead, CGDHead

P_OF = {'S': 1.0, 'M': math.inf, 'G': 3.0}


def naive_pool(x: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, C), written from the formulas, not from the library."""
    if math.isinf(p):
        return x.flatten(2).max(dim=2).values
    if p == 1.0:
        return x.flatten(2).sum(dim=2) / (x.shape[2] * x.shape[3])
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def naive_head(head: CGDHead, x: torch.Tensor) -> torch.Tensor:
    parts = []
    for letter, fc in zip(head.descriptors, head.fcs):
        v = naive_pool(x, P_OF[letter]) @ fc.weight.T
        parts.append(v / v.norm(dim=1, keepdim=True))
    combined = torch.cat(parts, dim=1) if head.combine == 'concat' else sum(parts)
    return combined / combined.norm(dim=1, keepdim=True)


@pytest.mark.parametrize('descriptors', ['S', 'M', 'G', 'SG', 'GS', 'MG', 'SMG'])
@pytest.mark.parametrize('combine', ['concat', 'sum'])
def test_head_matches_naive_recomputation(descriptors, combine):
    torch.manual_seed(0)
    head = CGDHead(16, descriptors, embed_dim=24, combine=combine)
    x = torch.rand(3, 16, 5, 7)
    out = head(x)
    assert out.shape == (3, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out, naive_head(head, x), rtol=1e-5, atol=1e-6)
    expected_branch = 24 // len(descriptors) if combine == 'concat' else 24
    assert all(fc.weight.shape == (expected_branch, 16) and fc.bias is None for fc in head.fcs)


def test_concat_keeps_branch_order():
    torch.manual_seed(0)
    head = CGDHead(8, 'MS', embed_dim=8)
    x = torch.rand(2, 8, 4, 4)
    out = head(x) * math.sqrt(2)  # each normalised branch has norm 1 before the final normalisation
    first = F.normalize(naive_pool(x, math.inf) @ head.fcs[0].weight.T, dim=1)
    torch.testing.assert_close(out[:, :4], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('descriptors, first_p', [('SG', 1.0), ('GS', 3.0), ('MG', math.inf)])
def test_first_letter_feeds_the_classifier(descriptors, first_p):
    torch.manual_seed(0)
    head = CGDHead(8, descriptors, embed_dim=8, num_classes=5, temperature=0.5).eval()
    x = torch.rand(4, 8, 3, 3)
    emb, logits = head.forward_train(x)
    aux = head.aux_head
    bn = (naive_pool(x, first_p) - aux.norm.running_mean) / torch.sqrt(aux.norm.running_var + aux.norm.eps)
    expected = ((bn * aux.norm.weight + aux.norm.bias) @ aux.fc.weight.T + aux.fc.bias) / 0.5
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb, head(x))


def test_eval_forward_never_computes_logits():
    head = CGDHead(8, 'SG', embed_dim=8, num_classes=5).eval()
    calls = []
    head.aux_head.register_forward_hook(lambda *a: calls.append(1))
    head(torch.rand(2, 8, 3, 3))
    assert not calls
    head.forward_train(torch.rand(2, 8, 3, 3))
    assert calls


def test_forward_train_without_classifier_returns_none():
    emb, logits = CGDHead(8, 'SG', embed_dim=8).forward_train(torch.rand(2, 8, 3, 3))
    assert logits is None and emb.shape == (2, 8)


def test_every_parameter_gets_a_gradient():
    head = CGDHead(8, 'SMG', embed_dim=12, num_classes=4, learnable_p=True).train()
    emb, logits = head.forward_train(torch.rand(6, 8, 4, 4))
    (emb.sum() * 0 + (emb[:, 0] * torch.arange(6.)).sum() + emb[:, 5].sum() + emb[:, 9].sum()
     + logits.logsumexp(1).sum()).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize('input_fmt', ['NHWC', 'NLC'])
def test_channels_last_and_tokens_match_nchw(input_fmt):
    torch.manual_seed(0)
    ref = CGDHead(8, 'SMG', embed_dim=12)
    head = CGDHead(8, 'SMG', embed_dim=12, input_fmt=input_fmt)
    head.load_state_dict(ref.state_dict())
    x = torch.rand(2, 8, 3, 4)
    y = x.permute(0, 2, 3, 1) if input_fmt == 'NHWC' else x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(head(y), ref(x))


def test_prefix_tokens_are_excluded_from_pooling():
    torch.manual_seed(0)
    ref = CGDHead(8, 'SMG', embed_dim=12, input_fmt='NLC')
    head = CGDHead(8, 'SMG', embed_dim=12, input_fmt='NLC', num_prefix_tokens=2)
    head.load_state_dict(ref.state_dict())
    tokens = torch.rand(2, 10, 8)
    prefixed = torch.cat([torch.full((2, 2, 8), 1e3), tokens], dim=1)  # huge class tokens would dominate MAC
    torch.testing.assert_close(head(prefixed), ref(tokens))


def test_state_dict_roundtrip_and_compile():
    head = CGDHead(8, 'SG', embed_dim=8, num_classes=3, learnable_p=True).eval()
    clone = CGDHead(8, 'SG', embed_dim=8, num_classes=3, learnable_p=True).eval()
    clone.load_state_dict(head.state_dict())
    x = torch.rand(2, 8, 5, 5)
    assert torch.equal(clone(x), head(x))
    torch.testing.assert_close(torch.compile(head, fullgraph=True)(x), head(x))


def test_aux_loss_equals_formula():
    torch.manual_seed(0)
    aux = AuxSoftmaxHead(6, 5, temperature=0.5, label_smoothing=0.1)
    x, labels = torch.randn(8, 6), torch.randint(0, 5, (8,))
    logits = aux(x)
    raw = aux.fc(aux.norm(x))
    torch.testing.assert_close(logits, raw / 0.5)
    log_p = torch.log_softmax(raw / 0.5, dim=1)
    expected = (0.9 * -log_p[torch.arange(8), labels] + 0.1 * -log_p.mean(dim=1)).mean()
    torch.testing.assert_close(aux.loss(logits, labels), expected)


def test_reset_classifier():
    head = CGDHead(8, 'SG', embed_dim=8, num_classes=3)
    head.reset_classifier(7)
    assert head.num_classes == 7 and head.aux_head.fc.out_features == 7
    head.reset_classifier(0)
    assert head.aux_head is None and head.num_classes == 0


@pytest.mark.parametrize('kwargs, match', [
    (dict(descriptors=''), 'at least one'), (dict(descriptors='sg'), "upper case: 'SG'"),
    (dict(descriptors='SX'), "unknown letters \\['X'\\]"), (dict(descriptors='SS'), 'repeats'),
    (dict(descriptors=['S']), 'string'), (dict(embed_dim=100, descriptors='SMG'), 'multiple of 3 such as 99 or 102'),
    (dict(embed_dim=0), 'embed_dim'), (dict(combine='mean'), 'combine'), (dict(num_classes=-1), 'num_classes'),
    (dict(temperature=0.0), 'temperature'), (dict(label_smoothing=1.0), 'label_smoothing'),
    (dict(input_fmt='NCL'), 'input_fmt'), (dict(num_prefix_tokens=1), 'num_prefix_tokens'),
    (dict(gem_p=-1.0), 'p must be > 0'), (dict(in_features=0), 'in_features'),
])
def test_bad_arguments(kwargs, match):
    args = dict(in_features=8, embed_dim=12)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        CGDHead(**args)


def test_bad_inputs_name_the_expected_layout():
    head = CGDHead(8, 'SG', embed_dim=8)
    with pytest.raises(ValueError, match='in_features=8.*got shape \\(2, 9, 3, 3\\)'):
        head(torch.rand(2, 9, 3, 3))
    with pytest.raises(ValueError, match='NCHW'):
        head(torch.rand(2, 8, 3))
    with pytest.raises(TypeError, match='floating point'):
        head(torch.ones(2, 8, 3, 3, dtype=torch.int64))
    aux = AuxSoftmaxHead(4, 3)
    with pytest.raises(ValueError, match=r'class ids in \[0, 3\)'):
        aux.loss(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match='integer'):
        aux.loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r'shape \(2,\)'):
        aux.loss(torch.randn(2, 3), torch.tensor([0, 1, 2]))


def test_empty_batch():
    assert CGDHead(8, 'SG', embed_dim=8)(torch.rand(0, 8, 3, 3)).shape == (0, 8)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(descriptors='S', gem_p='x'), TypeError, 'gem_p must be a float'),  # checked without G too
    (dict(descriptors='SM', gem_p=-1.0), ValueError, 'gem_p must be > 0'),
    (dict(descriptors='G', gem_p=math.inf, learnable_p=True), ValueError, 'gem_p=inf'),
    (dict(descriptors='SG', learnable_p='no'), TypeError, 'learnable_p must be True or False'),
    (dict(temperature='0.5'), TypeError, 'temperature'), (dict(label_smoothing=1.0), ValueError, 'label_smoothing'),
])
def test_head_arguments_are_named_as_the_head_names_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        CGDHead(8, **kwargs)


def test_concat_fc_head_leaves_prefix_tokens_out_as_cgd_head_does():
    from cgd_heads.layers.variants import ConcatFCHead
    torch.manual_seed(0)
    tokens = torch.rand(2, 5, 8)
    b = ConcatFCHead(8, 'SM', 6, input_fmt='NLC', num_prefix_tokens=1)
    pooled = b.pool(tokens)
    assert torch.equal(pooled[0], tokens[:, 1:].mean(1)) and torch.equal(pooled[1], tokens[:, 1:].amax(1))
    with pytest.raises(ValueError, match='num_prefix_tokens=1 only applies to token inputs'):
        ConcatFCHead(8, 'SM', 6, num_prefix_tokens=1)
