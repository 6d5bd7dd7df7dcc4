"""ONNX export verified with onnxruntime; TorchScript trace, torch.export and torch.compile of the heads."""
import importlib.util

import pytest
import torch

from cgd_heads import CGDHead, create_model
from cgd_heads.models.export import export_onnx, verify_onnx

needs_ort = pytest.mark.skipif(importlib.util.find_spec('onnxruntime') is None or
                               importlib.util.find_spec('onnxscript') is None,
                               reason='onnxruntime/onnxscript not installed (they are in the dev extra)')


@needs_ort
@pytest.mark.slow  # a dynamo export and an onnxruntime session per model
@pytest.mark.parametrize('name, kwargs', [
    ('test_resnet', dict(descriptors='GM', learnable_p=True)),  # learnable GeM and MAC
    ('test_vit', dict(descriptors='SMG')),                      # token pooling with a class token
])
def test_onnx_matches_pytorch_for_any_batch_size(name, kwargs, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, embed_dim=48, **kwargs).eval()
    with torch.no_grad():
        model.head.fcs[0].weight.mul_(3)  # any non-default weights
    path = export_onnx(model, tmp_path / 'model.onnx')
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 4):
        images = torch.randn(batch, *model.pretrained_cfg['input_size'])
        out = session.run(None, {'images': images.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(images), rtol=1e-4, atol=1e-4)
    assert abs(out[0] - out[1:]).max() > 1e-3  # different images, different embeddings


@needs_ort
def test_verify_catches_a_graph_that_ignores_its_input(tmp_path):
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.normalize(torch.ones(x.shape[0], 4) + 0 * x.mean(), dim=1)

    model = Constant()
    export_onnx(model, tmp_path / 'c.onnx', input_size=(3, 8, 8), verify=False)
    with pytest.raises(ValueError, match='ignores its input'):
        verify_onnx(model, tmp_path / 'c.onnx', (3, 8, 8))


def test_bad_path():
    with pytest.raises(ValueError, match='.onnx'):
        export_onnx(torch.nn.Identity(), 'model.pt')
    with pytest.raises(TypeError, match='opset must be a positive int'):
        export_onnx(torch.nn.Identity(), 'model.onnx', opset='18')


@needs_ort
def test_an_export_that_fails_verification_leaves_the_earlier_file(tmp_path):
    class Constant(torch.nn.Module):  # a graph that ignores its input: verification must fail
        def forward(self, x):
            return torch.nn.functional.normalize(torch.ones(x.shape[0], 4) + 0 * x.mean(), dim=1)

    path = tmp_path / 'model.onnx'
    path.write_bytes(b'the earlier, good export')
    with pytest.raises(ValueError, match=f'{path.name} not written: .*ignores its input'):
        export_onnx(Constant(), path, input_size=(3, 8, 8))
    assert path.read_bytes() == b'the earlier, good export'
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']  # no temporary file left behind


@pytest.mark.parametrize('absent, verify, named', [('onnxscript', True, 'onnxscript'),
                                                   ('onnxruntime', True, 'onnxruntime'),
                                                   ('onnxruntime', False, None)])
def test_missing_export_packages_are_named_with_the_extra_before_any_work(absent, verify, named, tmp_path,
                                                                          monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == absent else
                        real_find_spec(name, *a))
    present = all(real_find_spec(n) is not None for n in ('onnx', 'onnxscript', 'onnxruntime') if n != absent)
    if named is None:  # onnxruntime is only needed to verify
        if not present:
            pytest.skip('onnx/onnxscript not installed (they are in the dev extra)')
        assert export_onnx(torch.nn.Flatten(), tmp_path / 'f.onnx', input_size=(1, 2, 2), verify=False).is_file()
        return
    with pytest.raises(ImportError, match=rf"needs .*{named}.*pip install 'cgd_heads\[export\]'"):
        export_onnx(torch.nn.Flatten(), tmp_path / 'f.onnx', input_size=(1, 2, 2), verify=verify)
    assert not (tmp_path / 'f.onnx').exists()


def test_torchscript_trace_and_torch_export_match_eager():
    torch.manual_seed(0)
    model = create_model('test_resnet', descriptors='SMG', embed_dim=48, learnable_p=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(torch.flip(x, [0])), model(torch.flip(x, [0])))
    head = CGDHead(16, 'SMG', embed_dim=12, learnable_p=True).eval()
    features = torch.rand(3, 16, 5, 5)
    exported = torch.export.export(head, (features,))
    torch.testing.assert_close(exported.module()(features), head(features))


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = create_model('test_resnet', descriptors='SG', embed_dim=32).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled_head = torch.compile(model.head, fullgraph=True)  # no graph break inside our heads
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(compiled_head(features), model.head(features), rtol=1e-5, atol=1e-6)


@needs_ort
def test_cgd_export_cli(tmp_path, capsys):
    from cgd_heads.cli import export_main
    create_model('test_resnet', embed_dim=16).save_pretrained(tmp_path / 'ckpt', extra={'data': {'img_size': 48}})
    assert export_main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'm.onnx')]) == 0
    assert 'N x 3 x 48 x 48' in capsys.readouterr().out and (tmp_path / 'm.onnx').stat().st_size > 0
    assert export_main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'm.pt')]) == 2
