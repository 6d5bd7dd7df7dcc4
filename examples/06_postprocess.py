"""Whitening, query expansion, database augmentation and k-reciprocal re-ranking on a trained model's embeddings.

A model (``--checkpoint``, or a tiny one trained here on the training classes) embeds the training and the test
classes. Whitenings are learned on the TRAINING embeddings only: PCA-whitening (``Whitening.fit_pca``, eigenvalue
power ``--shrinkage``) and the supervised learned whitening of Radenovic et al. (``Whitening.fit_learned``, from
matching and non-matching pairs), both reducing to ``--whiten-dim``. The learned one is saved with the model's
fingerprint and loaded back (another model's fingerprint is refused). Each ``PostProcess`` row is then scored
query-vs-rest on the unseen test classes with ``evaluate_postprocessed`` (the metrics of ``evaluate_retrieval``).
DBA and re-ranking use the test collection itself (transductive); on real data choose their settings on held-out
training classes, never on the test classes (``benchmarks/postprocess.py`` does).

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    python examples/06_postprocess.py
    python examples/06_postprocess.py --data path/to/images --checkpoint runs/cars/best --train-classes 0.5 \
        --whiten-dim 256 --qe 2 --qe-alpha 3 --dba 2 --rerank 20,6,0.3
"""
import argparse

import cgd_heads
from cgd_heads.data import ImageDataset, create_cgd_transform, load_splits
from cgd_heads.utils.settings import count_or_fraction

from _synthetic import (add_checkpoint_arguments, add_data_arguments, checkpoint_or_tiny_model, data_folder,
                        output_folder)


def rerank_setting(text: str):
    """``'k1,k2,lambda'`` -> ``(k1, k2, lambda)``."""
    try:
        k1, k2, lam = text.split(',')
        return int(k1), int(k2), float(lam)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected k1,k2,lambda such as 20,6,0.3, got {text!r}') from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    add_checkpoint_arguments(parser)
    parser.add_argument('--train-classes', type=count_or_fraction, default=0.6,
                        help='classes whose embeddings the whitenings learn from (a fraction < 1 or a count); '
                             'the others are the test set')
    parser.add_argument('--whiten-dim', type=int, default=32, help='output dimension of the whitenings')
    parser.add_argument('--shrinkage', type=float, default=0.5, help='PCA-whitening: power on the eigenvalues')
    parser.add_argument('--qe', type=int, default=2, help='alpha-QE: neighbours averaged into each query')
    parser.add_argument('--qe-alpha', type=float, default=3.0, help='QE / DBA weights: similarity ** alpha')
    parser.add_argument('--dba', type=int, default=2, help='DBA: neighbours (the item included) per gallery item')
    parser.add_argument('--rerank', type=rerank_setting, default=(4, 2, 0.3),
                        help='k-reciprocal re-ranking k1,k2,lambda (the paper uses 20,6,0.3 on large galleries)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    args = parser.parse_args()
    out = output_folder(args.out, 'postprocess')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        splits = load_splits('folder', root, train_classes=args.train_classes)
        checkpoint = checkpoint_or_tiny_model(args, splits['train'], out / 'run')
        model, saved = cgd_heads.load_pretrained(checkpoint, return_config=True)
        data = saved['data']
        transform = create_cgd_transform(data, is_training=False, img_size=data['img_size'])

        def embed(name: str):
            embeddings, labels = cgd_heads.extract_embeddings(model, ImageDataset(splits[name], transform),
                                                              batch_size=64, device=args.device, progress=False)
            return embeddings.numpy(), labels.numpy()

        (train_x, train_y), (test_x, test_y) = embed('train'), embed('test')
    print(f'embeddings: {len(train_y)} training images (whitenings learn here), {len(test_y)} test images, '
          f'{train_x.shape[1]}-d')

    # learned on the training classes; saved with the fingerprint of the model they belong to, then reloaded
    fingerprint = cgd_heads.model_fingerprint(saved['model'])
    pca = cgd_heads.Whitening.fit_pca(train_x, dim=args.whiten_dim, shrinkage=args.shrinkage)
    cgd_heads.Whitening.fit_learned(train_x, train_y, dim=args.whiten_dim).save(out / 'whitening', fingerprint)
    learned = cgd_heads.Whitening.load(out / 'whitening', expected_fingerprint=fingerprint)
    print(f'learned whitening {learned.input_dim} -> {learned.dim} saved in {out / "whitening"}')

    rows = {
        'none': cgd_heads.PostProcess(),
        f'PCA-whitening {args.whiten_dim}': cgd_heads.PostProcess(whitening=pca),
        f'learned whitening {args.whiten_dim}': cgd_heads.PostProcess(whitening=learned),
        f'alpha-QE n={args.qe}': cgd_heads.PostProcess(qe=args.qe, qe_alpha=args.qe_alpha),
        f'DBA n={args.dba}': cgd_heads.PostProcess(dba=args.dba, qe_alpha=args.qe_alpha),
        're-ranking {},{},{}'.format(*args.rerank): cgd_heads.PostProcess(rerank=args.rerank),
        'learned whitening + QE + re-ranking': cgd_heads.PostProcess(whitening=learned, qe=args.qe,
                                                                     qe_alpha=args.qe_alpha, rerank=args.rerank),
    }
    ks = tuple(k for k in (1, 2, 4) if k < len(test_y))
    print(f'test classes, query-vs-rest ({len(test_y)} queries):')
    print('| post-processing | ' + ' | '.join(f'R@{k}' for k in ks) + ' | MAP@R |')
    print('|---' * (len(ks) + 2) + '|')
    for name, steps in rows.items():
        metrics = cgd_heads.evaluate_postprocessed(test_x, test_y, steps, ks=ks)
        cells = [100 * metrics[f'recall@{k}'] for k in ks] + [100 * metrics['map@r']]
        print(f'| {name} | ' + ' | '.join(f'{v:.1f}' for v in cells) + ' |')


if __name__ == '__main__':
    main()
