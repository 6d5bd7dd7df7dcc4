"""Build a faiss ``RetrievalIndex`` from a checkpoint's embeddings, save and reload it, search it, draw the results.

One image of each of the first ``--num-queries`` classes is kept aside as a query; every other image is embedded
with the checkpoint's model (``--checkpoint``, a folder written by ``train`` / ``cgd-train`` such as
``run/best``; without it a tiny model is trained on the gallery images first) and added to an exact inner-product
index together with its label and path. The index is saved to ``--out/index``, loaded back (the model
configuration stored with it must match), searched with the queries, and ``save_retrieval_grid`` draws one row per
query: the query, then its top-k results framed green (same class) or red.

Run (seconds on a CPU with the tiny defaults; a synthetic data set is written when --data is omitted):

    python examples/03_index_and_search.py
    python examples/03_index_and_search.py --data path/to/images --checkpoint runs/cars/best --top-k 8
"""
import argparse

import cgd_heads
from cgd_heads.data import ImageDataset, ImageList, create_cgd_transform, load_splits
from cgd_heads.retrieval import save_retrieval_grid

from _synthetic import (add_checkpoint_arguments, add_data_arguments, checkpoint_or_tiny_model, data_folder,
                        output_folder)


def take(images: ImageList, ids) -> ImageList:
    """The images at positions ``ids``, with the labels and class names of ``images``."""
    return ImageList([images.paths[i] for i in ids], [images.labels[i] for i in ids], images.class_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    add_checkpoint_arguments(parser)
    parser.add_argument('--num-queries', type=int, default=4, help='query images (one per class)')
    parser.add_argument('--top-k', type=int, default=5, help='results per query')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    args = parser.parse_args()
    out = output_folder(args.out, 'index_and_search')

    with data_folder(args.data, args.synthetic_classes, args.synthetic_per_class) as root:
        images = load_splits('folder', root)['all']
        # the first image of each of the first classes is a query, the rest is the gallery
        query_ids = [images.labels.index(c) for c in range(min(args.num_queries, images.num_classes))]
        gallery_ids = [i for i in range(len(images)) if i not in set(query_ids)]
        queries, gallery = take(images, query_ids), take(images, gallery_ids)

        checkpoint = checkpoint_or_tiny_model(args, gallery, out / 'run')
        model, saved = cgd_heads.load_pretrained(checkpoint, return_config=True)
        data = saved['data']
        transform = create_cgd_transform(data, is_training=False, img_size=data['img_size'])

        def embed(items: ImageList):
            return cgd_heads.extract_embeddings(model, ImageDataset(items, transform), batch_size=64,
                                                device=args.device, progress=False)

        # build, save and reload the index; the model configuration travels with it
        gallery_embeddings, gallery_labels = embed(gallery)
        index = cgd_heads.RetrievalIndex.build(gallery_embeddings, gallery_labels, gallery.paths, index_type='flat',
                                               metadata={'model': saved['model']})
        index.save(out / 'index')
        index = cgd_heads.RetrievalIndex.load(out / 'index', expected_metadata={'model': saved['model']})
        print(f'index: {len(index)} images, {index.dim}-d, {index.index_type}, saved in {out / "index"}')

        query_embeddings, query_labels = embed(queries)
        hits = index.search_hits(query_embeddings, k=args.top_k)
        for path, label, row in zip(queries.paths, query_labels.tolist(), hits):
            found = ', '.join(f'{images.class_names[h.label]} ({h.score:.3f})' for h in row)
            print(f'query {images.class_names[label]}: {found}')
        correct = sum(row[0].label == label for label, row in zip(query_labels.tolist(), hits))
        print(f'top-1 correct: {correct}/{len(hits)}')
        grid = save_retrieval_grid(
            queries.paths, query_labels.tolist(), [[h.path for h in row] for row in hits],
            [[h.label for h in row] for row in hits], out / 'retrieval_grid.png')
    print(f'grid: {grid}')


if __name__ == '__main__':
    main()
