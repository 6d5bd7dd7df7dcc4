"""The documentation site: it builds with ``mkdocs build --strict``, the API reference covers every public name,
every public name has docstrings, and the pages are all in the navigation and free of workspace paths."""
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

import cgd_heads

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
MKDOCS_YML = REPO / 'mkdocs.yml'
#: Folders under docs/ that hold build helpers, not pages (mkdocs.yml's exclude_docs).
NOT_PAGES = ('_ext',)
PUBLIC_NAMES = [name for name in cgd_heads.__all__ if name != '__version__']


def _require_mkdocs() -> None:
    """The docs extra pins releases that need Python >= 3.11: skip below that, fail loudly where it should be."""
    if importlib.util.find_spec('mkdocs') is None:
        if sys.version_info < (3, 11):
            pytest.skip('the docs extra needs Python >= 3.11')
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' torch==2.14.1 torchvision==0.29.1")


def test_mkdocs_build_strict(tmp_path):
    """The whole site builds with every warning an error: broken links and anchors, pages missing from the nav,
    API entries that do not resolve. Built outside the repository, never into site/."""
    _require_mkdocs()
    site = tmp_path / 'site'
    env = dict(os.environ, NO_MKDOCS_2_WARNING='1')  # Material's end-of-life banner, printed on every build
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f'mkdocs build --strict failed (exit {proc.returncode}, {seconds:.1f} s):\n{output}'
    for page in ('index.html', 'cli/index.html', 'training/index.html', 'api/layers/index.html'):
        assert (site / page).is_file(), f'{page} missing from the built site ({seconds:.1f} s build):\n{output}'
    api = (site / 'api' / 'layers' / 'index.html').read_text(encoding='utf-8')
    assert 'cgd_heads.layers.pooling.GeneralizedPooling' in api, f'API reference not rendered ({seconds:.1f} s)'
    assert ':class:' not in api, 'a Sphinx role reached the page: see docs/_ext/griffe_cgd.py'
    assert not (REPO / 'site').exists(), f'the build wrote into the repository ({seconds:.1f} s)'


def _own_doc(obj) -> str:
    doc = getattr(obj, '__doc__', None)
    return doc.strip() if isinstance(doc, str) else ''


def _missing_docstrings(name: str) -> List[str]:
    """What lacks a docstring: the name itself, and for a class its own docstring (not an inherited or dataclass-made
    one) and every public method, property, class- or staticmethod defined in a cgd_heads class of its MRO."""
    obj = getattr(cgd_heads, name)
    if not inspect.isclass(obj):
        return [] if _own_doc(obj) else [name]
    missing = []
    doc = obj.__dict__.get('__doc__')
    if not (isinstance(doc, str) and doc.strip()) or doc.startswith(f'{obj.__name__}('):  # dataclass's signature
        missing.append(name)
    for klass in obj.__mro__:
        if not (klass.__module__ or '').startswith('cgd_heads'):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith('_'):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                function = value.__func__
            elif isinstance(value, property):
                function = value.fget
            elif inspect.isfunction(value):
                function = value
            else:
                continue
            if not _own_doc(function):
                missing.append(f'{name}.{attr} (defined in {klass.__module__}.{klass.__qualname__})')
    return missing


@pytest.mark.parametrize('name', PUBLIC_NAMES)
def test_public_name_has_docstrings(name):
    """mkdocstrings silently renders an undocumented object as a bare signature; this test does not."""
    missing = _missing_docstrings(name)
    assert not missing, f'no docstring: {", ".join(missing)}'


def _api_pages() -> str:
    pages = sorted((DOCS / 'api').glob('*.md')) + ([DOCS / 'api.md'] if (DOCS / 'api.md').exists() else [])
    return '\n'.join(p.read_text(encoding='utf-8') for p in pages)


@pytest.mark.parametrize('name', PUBLIC_NAMES)
def test_api_reference_lists_public_name(name):
    """Each public name has a ``::: <defining module>.<name>`` entry, and that module really defines it."""
    module = cgd_heads._EXPORTS[name]
    assert getattr(importlib.import_module(module), name) is getattr(cgd_heads, name)
    identifier = f'{module}.{name}'
    lines = [line.strip() for line in _api_pages().splitlines()]
    assert f'::: {identifier}' in lines, f'docs/api/ has no "::: {identifier}" entry for cgd_heads.{name}'


def _pages() -> List[str]:
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob('*.md')
                  if p.relative_to(DOCS).parts[0] not in NOT_PAGES)


def _nav_files(node) -> List[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    return []


def test_every_page_is_in_nav():
    yaml = pytest.importorskip('yaml')
    config = yaml.safe_load(MKDOCS_YML.read_text(encoding='utf-8'))
    pages = _pages()
    assert 'index.md' in pages
    if 'nav' not in config:  # mkdocs then lists every page itself
        return
    listed = {f for f in _nav_files(config['nav']) if f.endswith('.md')}
    assert not set(pages) - listed, f'pages missing from mkdocs.yml nav: {sorted(set(pages) - listed)}'
    assert not listed - set(pages), f'nav entries without a page: {sorted(listed - set(pages))}'


@pytest.mark.parametrize('marker', ['../shared', '/work/'])
def test_docs_have_no_workspace_paths(marker):
    """Commands in the docs use placeholders (path/to/images, runs/my_run), never this workspace's folders."""
    files = [p for p in DOCS.rglob('*') if p.is_file() and p.suffix in ('.md', '.py', '.yml', '.yaml')]
    files.append(MKDOCS_YML)
    offending = [str(p.relative_to(REPO)) for p in files if marker in p.read_text(encoding='utf-8')]
    assert not offending, f'{marker!r} appears in {offending}'
