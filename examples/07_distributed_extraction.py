"""Distributed embedding extraction into work units, then an index built from the units and searched.

``extract_units`` cuts the image list into fixed units of ``--unit-size`` images (the cut does not depend on the
number of processes), and under torchrun every process embeds its share of the units, each image exactly once,
writing each finished unit atomically (safetensors + ids, paths and labels) beside a manifest holding the model's
and the image list's fingerprints. A rerun (with any number of processes) skips the finished units and refuses a
folder written by another model or list. Rank 0 then checks that every image is in exactly one unit,
``build_index_from_units`` builds sharded exact indexes (``--index flat``) or an IVF-PQ index trained on a sample
(``--index ivf``) reading one unit at a time, and ``load_index`` opens it for search with the first image of each
unit as a query: in an exact index each finds itself first (IVF-PQ codes are approximate, so not always).

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    torchrun --standalone --nproc_per_node 2 examples/07_distributed_extraction.py --out /tmp/units_demo
    python examples/07_distributed_extraction.py                 # one process, the same units
    OMP_NUM_THREADS=4 torchrun --standalone --nproc_per_node 4 examples/07_distributed_extraction.py \
        --data path/to/images --checkpoint runs/cars/best --unit-size 10000 --index ivf --out runs/gallery

Without ``--checkpoint`` a tiny randomly initialised model (same seed in every process) stands in for a trained
one. Every process reads the same ``--data``; pass ``--out`` so that all processes agree on the units folder.
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

import cgd_heads
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, load_splits

from _synthetic import add_data_arguments, data_folder, output_folder


def load_model(args: argparse.Namespace):
    """The checkpoint's model and image settings, or a seeded tiny model (the same weights in every process)."""
    if args.checkpoint:
        model, saved = cgd_heads.load_pretrained(args.checkpoint, return_config=True)
        return model, saved['data']
    torch.manual_seed(0)
    model = cgd_heads.create_model('test_resnet', embed_dim=64)
    return model, data_config_of(model, args.img_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument('--checkpoint', default=None, help='checkpoint folder (e.g. run/best); default: a tiny '
                                                           'random model')
    parser.add_argument('--unit-size', type=int, default=16, help='images per work unit')
    parser.add_argument('--index', choices=('flat', 'ivf'), default='flat',
                        help='flat: exact shards of --shard-size vectors; ivf: IVF-PQ trained on a sample')
    parser.add_argument('--shard-size', type=int, default=32, help='most vectors per flat shard')
    parser.add_argument('--num-queries', type=int, default=5, help='units whose first image is searched as a query')
    parser.add_argument('--img-size', type=int, default=48, help='image size of the tiny model')
    parser.add_argument('--device', default='auto', help='auto (one GPU per process when there are GPUs), cpu')
    args = parser.parse_args()
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and args.out is None:
        parser.error('under torchrun pass --out DIR: every process must write into the same units folder')
    out = output_folder(args.out, 'distributed_extraction')

    model, data = load_model(args)
    transform = create_cgd_transform(data, is_training=False, img_size=data['img_size'])
    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        images = load_splits('folder', root)['all']
        # collective: every process calls it with the same arguments and returns when all units are written
        units = cgd_heads.extract_units(model, ImageDataset(images, transform), out / 'units', images.paths,
                                        images.labels, preprocessing={'data_config': data},
                                        unit_size=args.unit_size, device=args.device,
                                        class_names=images.class_names)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized() and dist.get_rank() > 0:
        dist.destroy_process_group()
        return

    ids = np.concatenate([unit.ids for unit in units])
    print(f'{len(images)} images in {units.num_units} units of {units.unit_size}, embedded by {world_size} '
          f'process(es); each image exactly once: {bool(np.array_equal(np.sort(ids), np.arange(len(images))))}')
    kwargs = {'shard_size': args.shard_size} if args.index == 'flat' else \
        {'nlist': 2, 'pq_m': 8, 'pq_nbits': 4, 'train_size': len(images)}  # tiny: 16 codes per sub-quantiser
    index = cgd_heads.load_index(cgd_heads.build_index_from_units(units, out / 'index', args.index, **kwargs))
    print(f'index: {len(index)} vectors, {type(index).__name__}, saved in {out / "index"}')

    # the first image of each of the first units, searched as a query
    first = [units.read_unit(u) for u in range(min(args.num_queries, units.num_units))]
    paths = [unit.paths[0] for unit in first]
    hits = index.search_hits(np.stack([unit.embeddings[0] for unit in first]), k=3)
    found = sum(row[0].path == path for row, path in zip(hits, paths))
    for path, row in zip(paths, hits):
        print(f'query {path.rsplit("/", 2)[-2]}: ' + ', '.join(f'{h.score:.3f}' for h in row))
    print(f'queries that find themselves first: {found}/{len(hits)}')
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
