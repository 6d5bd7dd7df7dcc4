"""Bad input across the public API and the CLIs: a ValueError/TypeError (or one-line CLI error) naming the problem.

Module-specific cases live beside their modules (test_pooling, test_heads, test_loss, test_model, test_train,
test_data, test_metrics, test_index); this table covers the entry points a user meets first.
"""
import pytest
import torch

from cgd_heads import CGDHead, CGDLoss, GeneralizedPooling, create_model, strip_last_stride
from cgd_heads.cli import eval_main, search_main, train_main
from cgd_heads.data import create_cgd_transform, load_splits
from cgd_heads.retrieval.index import RetrievalIndex
from cgd_heads.retrieval.metrics import evaluate_retrieval
from cgd_heads.utils.runtime import amp_dtype, resolve_device
from cgd_heads.training import TrainConfig

UNIT = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
CASES = [
    (lambda: GeneralizedPooling(p=float('nan')), ValueError, 'p must be > 0'),
    (lambda: GeneralizedPooling(eps=-1.0), ValueError, 'eps'),
    (lambda: CGDHead(8, 'SGX'), ValueError, "unknown letters \\['X'\\]"),
    (lambda: CGDHead(8, 'smg'), ValueError, "upper case: 'SMG'"),
    (lambda: CGDHead(8, 'SG', embed_dim=-4), ValueError, 'embed_dim'),
    (lambda: CGDHead(8, 'SG', embed_dim=1537), ValueError, 'multiple of 2 such as 1536 or 1538'),
    (lambda: CGDHead(8, 'SG', temperature=-1.0), ValueError, 'temperature'),
    (lambda: CGDHead(8, 'SG', label_smoothing=-0.1), ValueError, 'label_smoothing'),
    (lambda: CGDHead(8, 'SG', num_classes=2.5), TypeError, 'num_classes must be an int >= 0, got float 2.5'),
    (lambda: CGDHead(8, 'SG', combine='max'), ValueError, 'combine'),
    (lambda: CGDHead(8, 'SG', input_fmt='NDHWC'), ValueError, 'input_fmt'),
    (lambda: CGDLoss(margin=float('nan')), ValueError, 'margin'),
    (lambda: create_model('resnet_50'), ValueError, 'did you mean'),
    (lambda: create_model('resnet18', stride_mode='dilated'), ValueError, 'stride_mode'),
    (lambda: create_model('crossvit_tiny_240'), ValueError, 'returns a list of 2, not one feature map'),
    (lambda: strip_last_stride(torch.nn.Linear(2, 2), mode='strip'), ValueError, 'a forward pass of one'),
    (lambda: TrainConfig(m_per_class=3, batch_size=8), ValueError, 'multiple of m_per_class'),
    (lambda: TrainConfig(val_classes=-1), ValueError, 'val_classes'),
    (lambda: TrainConfig(clip_grad=0.0), ValueError, 'clip_grad'),
    (lambda: evaluate_retrieval(UNIT, [0, 0, 1, 1, 2]), ValueError, 'labels'),
    (lambda: evaluate_retrieval(UNIT, [0, 0, 1, 1, 2, 2], ks=(0,)), ValueError, 'ks'),
    (lambda: evaluate_retrieval(UNIT * 3, [0, 0, 1, 1, 2, 2]), ValueError, 'L2-normalised'),
    (lambda: RetrievalIndex.build(UNIT, index_type='lsh'), ValueError, 'index_type'),
    (lambda: create_cgd_transform({'mean': [0.5] * 3, 'std': [0.5] * 3}, True, 224, 200), ValueError,
     'resize_size'),
    (lambda: load_splits('imagenet', '.'), ValueError, 'unknown data set'),
    (lambda: resolve_device('tpu'), ValueError, 'device'),
    (lambda: amp_dtype('fp8', torch.device('cpu')), ValueError, 'amp'),
]


@pytest.mark.parametrize('index', range(len(CASES)))
def test_api_rejects_bad_input(index):
    fn, error, match = CASES[index]
    with pytest.raises(error, match=match):
        fn()


def test_cli_option_errors_are_one_line(tmp_path, capsys):
    assert eval_main(['--checkpoint', str(tmp_path), '--data', str(tmp_path)]) == 2
    assert search_main(['x.png', '--index', str(tmp_path / 'none'), '--k', '0']) == 2
    assert train_main(['--data', str(tmp_path), '--out', str(tmp_path / 'r'), '--descriptors', 'SX']) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(': error: ' in e for e in errors), errors
    with pytest.raises(SystemExit):  # argparse's own usage error (exit status 2)
        eval_main(['--checkpoint', 'x', '--data', 'y', '--ks', '1,a'])
