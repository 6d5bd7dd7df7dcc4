"""A griffe extension for the API reference (mkdocs.yml loads it through mkdocstrings; not part of the package).

Two things the docstrings of ``cgd_heads`` do that the Google-style renderer does not understand:

* Sphinx roles such as ``:class:`~cgd_heads.CGDHead``` or ``:meth:`save_pretrained```. Each becomes an optional
  cross-reference: a link when the target is documented on the site, plain code otherwise (never a build error).
  Public names are mapped to their defining module through ``cgd_heads._EXPORTS`` (``cgd_heads.CGDHead`` ->
  ``cgd_heads.layers.heads.CGDHead``), relative names are resolved in the scope of the documented object.
* Dataclass fields declared with ``cgd_heads.utils.settings.setting(default, help, ...)`` (``TrainConfig``). Their
  help text becomes the field's docstring and their default its value, so the signature reads ``epochs: int = 20``
  and each field is documented with its ``cgd-train`` option.

The package is read statically, never imported.
"""
from __future__ import annotations

import ast
import html
import re
from pathlib import Path
from typing import Any, Dict, Optional

import griffe

_ROLE = re.compile(r':(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([A-Za-z_][\w.]*)(?:\(\))?`')


def _exports(init: Path) -> Dict[str, str]:
    """``cgd_heads._EXPORTS`` (public name -> defining module), read from the source without importing it."""
    for node in ast.parse(init.read_text(encoding='utf-8')).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '_EXPORTS' for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f'{init} defines no _EXPORTS')


def _setting_call(value: Any) -> Optional[griffe.ExprCall]:
    if isinstance(value, griffe.ExprCall) and str(value.function) == 'setting':
        return value
    return None


def _literal(expr: Any) -> Any:
    return ast.literal_eval(str(expr))


class CGDDocs(griffe.Extension):
    """Settings fields -> documented attributes; Sphinx roles -> optional cross-references."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: Dict[str, str] = {}

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = _setting_call(attr.value)
        if call is None or attr.docstring is not None:
            return
        positional = [a for a in call.arguments if not isinstance(a, griffe.ExprKeyword)]
        keywords = {a.name: a.value for a in call.arguments if isinstance(a, griffe.ExprKeyword)}
        if len(positional) < 2:
            return
        text = str(_literal(positional[1])).replace('%%', '%')  # argparse help strings escape %
        if keywords.get('cli') is not None and _literal(keywords['cli']) is False:
            text += '\n\nNot a command-line option.'
        else:
            flag = _literal(keywords['flag']) if 'flag' in keywords else '--' + attr.name.replace('_', '-')
            text += f'\n\nCommand-line option: `{flag}`.'
        attr.docstring = griffe.Docstring(text, parent=attr)
        attr.value = positional[0]  # the signature shows the default, not the setting() call

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != 'cgd_heads':
            return
        self.exports = _exports(Path(str(pkg.filepath)))
        seen: set = set()
        self._walk(pkg, seen)

    def _walk(self, obj: griffe.Object, seen: set) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None and ':' in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(lambda m: self._reference(obj, m), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)

    def _reference(self, owner: griffe.Object, match: 're.Match[str]') -> str:
        short, target = match.group(1) == '~', match.group(2)
        title = target.rsplit('.', 1)[-1] if short else target
        return (f'<autoref identifier="{html.escape(self._resolve(owner, target))}" optional>'
                f'<code>{html.escape(title)}</code></autoref>')

    def _resolve(self, owner: griffe.Object, target: str) -> str:
        parts = target.split('.')
        if parts[0] == 'cgd_heads':
            if len(parts) > 1 and parts[1] in self.exports:
                return '.'.join([self.exports[parts[1]], *parts[1:]])
            return target
        if parts[0] in self.exports:
            return '.'.join([self.exports[parts[0]], *parts])
        scope = owner if owner.is_class or owner.is_module else owner.parent
        while scope is not None:
            try:
                return '.'.join([scope.resolve(parts[0]), *parts[1:]])
            except Exception:  # griffe.NameResolutionError, or an alias it cannot follow
                scope = scope.parent
        return target
