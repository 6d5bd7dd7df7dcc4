"""faiss, imported in one place for the retrieval layer: a missing faiss fails at import with the install command,
not later as a NameError (as a silent optional import would)."""
try:
    import faiss
except ImportError as exc:  # faiss is a hard dependency of retrieval
    raise ImportError(
        'cgd_heads.retrieval needs faiss for nearest-neighbour search: install it with `pip install faiss-cpu` '
        '(or faiss-gpu)'
    ) from exc

__all__ = ['faiss']
