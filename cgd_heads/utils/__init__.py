"""Helpers every layer of cgd_heads may use: atomic files, device/precision/seeding, argument checks, the
``torchrun`` process group and dataclass-generated command-line options.

Nothing is imported here, so that loading one helper does not load the others (``torch.distributed`` for a
checkpoint write, for instance); import from the modules: ``from cgd_heads.utils.atomic import atomic_dir``.
"""
