"""Data-parallel training with torchrun: the same ``train`` call, one process per device (gloo on CPUs).

``cgd_heads.train`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): it joins the process
group (NCCL on CUDA, gloo on the CPU), wraps the model in DistributedDataParallel, gives every process its share
of each global m-per-class batch (``batch_size`` stays the global batch) and mines triplets over the embeddings
of all processes. Rank 0 validates and writes the checkpoints; the script prints only there. Without torchrun the
same script trains in one process.

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    torchrun --standalone --nproc_per_node 2 examples/05_torchrun_training.py
    python examples/05_torchrun_training.py                     # one process
    OMP_NUM_THREADS=4 torchrun --standalone --nproc_per_node 4 examples/05_torchrun_training.py \
        --data path/to/images --model resnet50 --img-size 224 --embed-dim 1536 --batch-size 128 --epochs 20

Every process reads the same ``--data``; without it each writes the same synthetic set (fixed seed) to its own
temporary folder. Pass ``--out`` so that all processes agree on the run folder.
"""
import argparse

import torch.distributed as dist

import cgd_heads
from cgd_heads.data import load_splits

from _synthetic import add_data_arguments, data_folder, output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument('--model', default='test_resnet', help='timm backbone name')
    parser.add_argument('--img-size', type=int, default=48, help='image size')
    parser.add_argument('--embed-dim', type=int, default=64, help='size of the combined embedding')
    parser.add_argument('--batch-size', type=int, default=16,
                        help='global batch: split evenly over the processes, so divisible by their number')
    parser.add_argument('--m-per-class', type=int, default=4, help='images per class in a (global) batch')
    parser.add_argument('--epochs', type=int, default=2, help='training epochs')
    parser.add_argument('--iters-per-epoch', type=int, default=3, help='batches per epoch (0: one pass)')
    parser.add_argument('--val-classes', type=int, default=2, help='classes held out to select the best epoch')
    parser.add_argument('--device', default='auto', help='auto (one GPU per process when there are GPUs), cpu')
    args = parser.parse_args()
    out = output_folder(args.out, 'torchrun_training')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        images = load_splits('folder', root)['all']
        config = cgd_heads.TrainConfig(
            model_name=args.model, img_size=args.img_size, embed_dim=args.embed_dim, batch_size=args.batch_size,
            m_per_class=args.m_per_class, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch or None,
            lr=1e-3, val_classes=args.val_classes, device=args.device, num_workers=0, progress=False)
        result = cgd_heads.train(config, images, out / 'run')

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if result.is_main:
        for row in result.history:
            print(f'epoch {row["epoch"]}: loss {row["loss_total"]:.4f}, {row["images_per_s"]:.1f} images/s, '
                  f'val Recall@1 {row["val_recall@1"]:.4f}')
        print(f'trained on {world_size} process(es); best val Recall@1 {result.best_metric:.4f}; '
              f'best checkpoint: {result.best_dir}')
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
