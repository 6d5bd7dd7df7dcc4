"""extract_embeddings against embedding the batches by hand."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cgd_heads import create_model
from cgd_heads.retrieval.extract import extract_embeddings


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return create_model('test_resnet', embed_dim=16).eval()


def test_plain_extraction_matches_the_model(model):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10) % 3
    emb, out_labels = extract_embeddings(model, TensorDataset(images, labels), batch_size=4, device='cpu',
                                         progress=False)
    with torch.no_grad():
        torch.testing.assert_close(emb, model(images), rtol=1e-4, atol=1e-5)
    assert torch.equal(out_labels, labels) and emb.dtype == torch.float32


def test_flip_and_scales_average_the_views(model):
    images, labels = torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)
    emb, _ = extract_embeddings(model, TensorDataset(images, labels), batch_size=4, device='cpu', flip=True,
                                scales=(1.0, 0.5), progress=False)
    with torch.no_grad():
        small = F.interpolate(images, scale_factor=0.5, mode='bilinear', align_corners=False)
        views = [model(images), model(images.flip(-1)), model(small), model(small.flip(-1))]
    torch.testing.assert_close(emb, F.normalize(sum(views), dim=1), rtol=1e-4, atol=1e-5)


def test_training_mode_is_restored(model):
    model.train()
    extract_embeddings(model, TensorDataset(torch.randn(2, 3, 32, 32), torch.zeros(2)), device='cpu', progress=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize('scales', [(), (0.0,), (-1.0,)])
def test_bad_scales(model, scales):
    with pytest.raises(ValueError, match='scales'):
        extract_embeddings(model, TensorDataset(torch.randn(2, 3, 8, 8), torch.zeros(2)), scales=scales)
