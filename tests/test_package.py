"""The package's shape: sub-packages import only the layers below them, no import cycle (imports inside functions
counted too), no function over 60 lines of code, and ``import cgd_heads`` stays light (names load on first use)."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import cgd_heads

PACKAGE = Path(cgd_heads.__file__).resolve().parent

#: What each sub-package (or top-level module) may import from the package, besides itself. One direction:
#: utils <- layers <- models <- losses <- training <- cli; data and retrieval use only utils / layers / models.
ALLOWED = {
    'version': set(),
    'utils': {'version'},
    'layers': {'utils'},
    'models': {'utils', 'layers', 'version'},
    'losses': {'utils', 'layers', 'models'},
    'data': {'utils', 'layers', 'models'},
    'retrieval': {'utils', 'layers', 'models'},
    'training': {'utils', 'layers', 'models', 'losses', 'data', 'retrieval'},
    'cli': {'utils', 'layers', 'models', 'losses', 'data', 'retrieval', 'training'},
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(source: str, module: str, is_package: bool, known: Set[str]) -> Set[str]:
    """Every package module ``module`` imports, at the top or inside a function: ``from ..x import y`` names the
    module ``x.y`` when that is a module, else ``x``."""
    found: Set[str] = set()
    package = module if is_package else module.rpartition('.')[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split('.')[0] == 'cgd_heads')
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition('.')[0]
            target = (f'{base}.{node.module}' if node.module else base) if node.level else (node.module or '')
            if target.split('.')[0] != 'cgd_heads':
                continue
            subs = {f'{target}.{a.name}' for a in node.names} & known
            found.update(subs or {target})
    return found


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports, for every ``.py`` below ``root``."""
    files = {_module_name(p, root): p for p in root.rglob('*.py')}
    known = set(files)
    return {name: imports_of(p.read_text(encoding='utf-8'), name, p.name == '__init__.py', known) & known
            for name, p in files.items()}


def layer_of(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """``'a imports b'`` for each import from a layer the rule does not allow (the top-level __init__ is exempt)."""
    bad = []
    for module, targets in graph.items():
        layer = layer_of(module)
        if not layer:
            continue
        for target in targets:
            other = layer_of(target)
            if other != layer and other not in ALLOWED.get(layer, set()):
                bad.append(f'{module} imports {target}')
    return sorted(bad)


def cycles(graph: Dict[str, Set[str]]) -> List[Tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[Tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_sub_packages_import_only_the_layers_below():
    graph = import_graph(PACKAGE)
    assert set(layer_of(m) for m in graph) - {''} == set(ALLOWED), 'a sub-package is missing from ALLOWED'
    assert layer_violations(graph) == []
    assert cycles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_cycle_inside_a_function(tmp_path):
    root = tmp_path / 'cgd_heads'
    for rel, source in {
        '__init__.py': '', 'models/__init__.py': '', 'training/__init__.py': '',
        'models/a.py': 'def f():\n    from ..training.b import g  # upward, hidden in a function\n',
        'training/b.py': 'from ..models import a\n',
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    graph = import_graph(root)
    assert graph['cgd_heads.models.a'] == {'cgd_heads.training.b'}
    assert graph['cgd_heads.training.b'] == {'cgd_heads.models.a'}
    assert layer_violations(graph) == ['cgd_heads.models.a imports cgd_heads.training.b']
    assert cycles(graph) == [('cgd_heads.models.a', 'cgd_heads.training.b')]


def _code_lines(node: ast.AST) -> int:
    """Lines of a function from its first statement after the docstring to its end."""
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    first = body[1].lineno if has_doc and len(body) > 1 else body[0].lineno
    return node.end_lineno - first + 1


def test_no_function_over_60_lines_of_code():
    long = []
    for path in sorted(PACKAGE.rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 60:
                long.append(f'{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({_code_lines(node)} lines)')
    assert long == []


def test_import_and_a_head_forward_load_neither_faiss_nor_the_trainer():
    code = ('import sys, torch, cgd_heads\n'
            'head = cgd_heads.CGDHead(16, "SG", 8)\n'
            'assert head(torch.randn(2, 16, 3, 3)).shape == (2, 8)\n'
            'print(sorted(m for m in ("faiss", "timm", "cgd_heads.training", "cgd_heads.retrieval", '
            '"cgd_heads.models") if m in sys.modules))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_public_names_resolve_and_match_all():
    exports = set(cgd_heads._EXPORTS)
    assert exports == set(cgd_heads.__all__) - {'__version__'}
    for name in cgd_heads.__all__:
        assert getattr(cgd_heads, name) is not None
        assert name in dir(cgd_heads)
    assert cgd_heads.CGDHead.__module__ == 'cgd_heads.layers.heads'
    with pytest.raises(AttributeError, match='no attribute'):
        cgd_heads.not_a_name  # noqa: B018
