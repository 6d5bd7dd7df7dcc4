"""What only a CUDA machine can check: mixed precision (bf16, and fp16 with its gradient scaler), pinned-memory
loading and the NCCL backend. Skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them on one."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cgd_heads import create_model
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, read_image_folder
from cgd_heads.training import TrainConfig, train
from cgd_heads.training.distributed import DistributedMPerClassSampler
from cgd_heads.training.trainer import _loader
from cgd_heads.utils.distributed import DistributedContext, all_reduce_mean
from cgd_heads.utils.runtime import autocast

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (benchmarks/gpu_check.sh)')]


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_embeddings_match_float32(amp):
    model = create_model('test_resnet', descriptors='SMG', embed_dim=64).cuda().eval()
    images = torch.randn(8, 3, 64, 64, device='cuda')
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    with torch.no_grad():
        exact = model(images)
        with autocast(torch.device('cuda'), dtype):
            mixed = model(images)
    assert F.cosine_similarity(exact, mixed.float(), dim=1).min() > 0.99


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_training_with_amp_on_cuda(shapes_folder, tmp_path, amp):
    config = TrainConfig(model_name='test_resnet', embed_dim=32, img_size=32, batch_size=12, m_per_class=2,
                         epochs=2, iters_per_epoch=3, val_classes=2, num_workers=0, progress=False, device='cuda',
                         amp=amp)
    result = train(config, read_image_folder(shapes_folder)['all'], tmp_path / 'run')
    assert all(torch.isfinite(torch.tensor(row['loss_total'])) for row in result.history)
    assert next(result.model.parameters()).device.type == 'cuda'
    assert result.best_metric is not None


def test_loader_pins_memory_on_cuda(shapes_folder):
    images = read_image_folder(shapes_folder)['all']
    config = TrainConfig(model_name='test_resnet', img_size=32, batch_size=8, m_per_class=2, iters_per_epoch=1,
                         num_workers=1)
    data_config = data_config_of(create_model('test_resnet'), 32)
    dataset = ImageDataset(images, create_cgd_transform(data_config, True, 32))
    batch, labels = next(iter(_loader(dataset, config, torch.device('cuda'), DistributedContext())))
    assert batch.is_pinned() and labels.is_pinned()


def test_nccl_with_one_process():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        context = DistributedContext(rank=0, world_size=1)
        value = torch.tensor([3.0], device='cuda')
        dist.all_reduce(value)
        assert value.item() == 3.0 and all_reduce_mean(value, context).item() == 3.0
        sampler = DistributedMPerClassSampler([0, 0, 1, 1, 2, 2], 2, 4, 8, 0, 1)
        assert len(list(iter(sampler))) == 8
    finally:
        dist.destroy_process_group()
