"""Two gloo processes on the CPU: the distributed loss and gradients equal the single-process ones on the whole
batch, the distributed sampler splits the single-process batches, and torchrun runs cgd-train."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cgd_heads import CGDHead, CGDLoss
from cgd_heads.training.distributed import DistributedMPerClassSampler
from cgd_heads.utils.runtime import seed_everything

WORLD = 2
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2, 3])


def make_head_and_batch():
    torch.manual_seed(0)
    head = CGDHead(8, 'SMG', embed_dim=12, num_classes=6).eval()  # eval: BatchNorm uses running stats on every rank
    features = torch.rand(len(LABELS), 8, 4, 4, generator=torch.Generator().manual_seed(1))
    return head, features


class Step(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.forward_train(x)


def worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    head, features = make_head_and_batch()
    step = torch.nn.parallel.DistributedDataParallel(Step(head))
    criterion = CGDLoss(aux_loss=head.aux_head.loss).make_distributed(WORLD)
    share = len(LABELS) // WORLD
    local = slice(rank * share, (rank + 1) * share)
    embeddings, logits = step(features[local])
    criterion(embeddings, LABELS[local], logits).backward()
    if rank == 0:
        torch.save({'ranking': criterion.last_parts['ranking'],
                    'grads': {n: p.grad for n, p in head.named_parameters()}}, out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_loss_and_gradients_equal_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / 'init'), str(tmp_path / 'out.pt')), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / 'out.pt', weights_only=True)
    head, features = make_head_and_batch()
    criterion = CGDLoss(aux_loss=head.aux_head.loss)
    embeddings, logits = head.forward_train(features)
    criterion(embeddings, LABELS, logits).backward()
    torch.testing.assert_close(result['ranking'], criterion.last_parts['ranking'])
    for name, param in head.named_parameters():
        torch.testing.assert_close(result['grads'][name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_distributed_sampler_splits_the_single_process_batches():
    labels = [i // 5 for i in range(60)]
    seed_everything(3)
    single = list(DistributedMPerClassSampler(labels, 4, 16, 48, rank=0, world_size=1))
    shards = []
    for rank in range(WORLD):
        seed_everything(3)
        shards.append(list(DistributedMPerClassSampler(labels, 4, 16, 48, rank=rank, world_size=WORLD)))
    rebuilt = [i for b in range(3) for r in range(WORLD) for i in shards[r][8 * b:8 * (b + 1)]]
    assert rebuilt == single and len(shards[0]) == 24
    with pytest.raises(ValueError, match='divisible by the 3 processes'):
        DistributedMPerClassSampler(labels, 4, 16, 48, rank=0, world_size=3)


@pytest.mark.slow  # starts two processes under torchrun
def test_torchrun_trains_and_rank_zero_writes(shapes_folder, tmp_path):
    script = Path(sys.executable).parent / 'cgd-train'
    if not script.exists():
        pytest.skip(f'{script} not installed (pip install -e .)')
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}', str(script),
         '--data', str(shapes_folder), '--train-classes', '6', '--val-classes', '2', '--model', 'test_resnet',
         '--embed-dim', '16', '--img-size', '24', '--batch-size', '8', '--m-per-class', '2', '--epochs', '2',
         '--num-workers', '0', '--quiet', '--no-test', '--out', str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and all('val_recall@1' in r for r in rows)
    assert (out / 'best' / 'model.safetensors').is_file() and (out / 'last' / 'training_state.safetensors').is_file()
    assert proc.stdout.count('best checkpoint:') == 1, proc.stdout  # only rank 0 reports
