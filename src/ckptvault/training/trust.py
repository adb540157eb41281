"""Which modules a checkpoint may make this process import, and from where.

A checkpoint is untrusted input, and the ``module:qualname`` its architecture records names code:
importing a module runs it. So a module is imported on a checkpoint's behalf only when the running
program trusted it *before* the import:

* it is imported already (in ``sys.modules``): the program runs that code anyway, and naming it
  runs nothing new; or
* an explicit allow-list names it or a package above it: ``trusted_modules=`` on
  :func:`ckptvault.load_model`, :func:`ckptvault.validate` and the exports, ``--trust`` on the
  command line, else the environment variable ``CKPTVAULT_TRUSTED_MODULES`` (comma-separated; an
  explicit list replaces it, as every ``CKPTVAULT_*`` knob). ``"pkg"`` trusts ``pkg`` and
  ``pkg.sub``, never ``pkgx``. ``allowed_modules=`` (older) is the narrowing form: *only* those
  modules, imported or not, and those may be imported.

Even a trusted module is never imported from where a checkpoint's author could have put a file:
:meth:`TrustPolicy.import_path` is ``sys.path`` without ``''``, relative entries and the current
directory (``python -c`` and ``-m`` put them there), the checkpoint's directory (and anything in it)
and the directory holding it; a module found in one of those anyway is refused before it is loaded
(:meth:`TrustPolicy.forbidden_origin`).

Full validation runs in another process, whose ``sys.modules`` is not the program's. The program
sends what it trusts (:meth:`TrustPolicy.for_worker`): its allow-list, the checkpoint's factory
module when it has imported that itself (it wrote the checkpoint), and the directories it imported
them from (``roots``, exempt from the current-directory rule: the program loaded that code from
there). The worker trusts that and its own startup imports, nothing else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

ENV = "CKPTVAULT_TRUSTED_MODULES"
ROOTS_ENV = "CKPTVAULT_TRUSTED_ROOTS"  # set by ckptvault for its one-shot workers only


def parse_modules(text: str) -> tuple[str, ...]:
    """``"a, b.c"`` → ``("a", "b.c")``: the environment variable's form."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _names(modules: Iterable[str]) -> tuple[str, ...]:
    if isinstance(modules, str):  # a lone "pkg" would otherwise trust "p", "k", "g"
        modules = [modules]
    names = tuple(str(m).strip() for m in modules)
    return tuple(n for n in names if n)


def _covered(module: str, names: Iterable[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class TrustPolicy:
    """What may be imported on a checkpoint's behalf; see the module docstring."""

    modules: tuple[str, ...] = ()  # explicit allow-list: each trusts itself and its submodules
    only: tuple[str, ...] | None = None  # allowed_modules: nothing else, imported or not
    roots: tuple[str, ...] = ()  # directories the trusting program imported its modules from
    cwds: tuple[str, ...] = ()  # further directories treated like the current directory
    imported: frozenset[str] | None = None  # modules imported "by the program"; None: sys.modules

    @classmethod
    def create(
        cls, trusted_modules: Sequence[str] | None = None, allowed_modules: Sequence[str] | None = None
    ) -> TrustPolicy:
        """The caller's policy: ``trusted_modules``, else ``CKPTVAULT_TRUSTED_MODULES``."""
        if trusted_modules is None:
            modules = parse_modules(os.environ.get(ENV, ""))
        else:
            modules = _names(trusted_modules)
        return cls(modules, None if allowed_modules is None else _names(allowed_modules))

    def is_imported(self, module: str) -> bool:
        if self.imported is not None:
            return module in self.imported
        return sys.modules.get(module) is not None

    def refusal(self, module: str) -> str | None:
        """Why ``module`` may not be imported or used for a checkpoint; None when it may."""
        if self.only is not None:
            if _covered(module, self.only):
                return None
            return f"factory module {module!r} is not in allowed_modules {list(self.only)}"
        if self.is_imported(module) or _covered(module, self.modules):
            return None
        return (
            f"cannot import the checkpoint's model factory module {module!r}: it is not trusted (this "
            "program has not imported it and no allow-list names it; a checkpoint cannot make a program "
            "run code). "
            f"If you trust it, import it first or pass trusted_modules=['{module}'] "
            f"(command line: --trust {module}; environment: {ENV}={module})"
        )

    # -- where an import may look --------------------------------------------------------------
    def _blocked_dirs(self, checkpoint: str | None) -> tuple[set[str], list[str], set[str]]:
        """(current directories, checkpoint trees, checkpoint parents), all real paths."""
        cwds = {_real(os.getcwd()), *(_real(c) for c in self.cwds if c)}
        trees: list[str] = []
        parents: set[str] = set()
        if checkpoint:
            tree = _real(os.fspath(checkpoint))
            trees.append(tree)
            parents.add(os.path.dirname(tree))
        return cwds, trees, parents

    def import_path(self, checkpoint: str | None) -> list[str]:
        """``sys.path`` as an import on ``checkpoint``'s behalf may see it (module docstring)."""
        cwds, trees, parents = self._blocked_dirs(checkpoint)
        roots = {_real(r) for r in self.roots if r and os.path.isabs(r)}
        kept: list[str] = []
        for entry in [*sys.path, *self.roots]:
            if not isinstance(entry, str) or not entry or not os.path.isabs(entry) or entry in kept:
                continue
            real = _real(entry)
            if any(_inside(real, t) for t in trees) or real in parents:
                continue
            if real in cwds and real not in roots:
                continue
            kept.append(entry)
        return kept

    def forbidden_origin(self, spec: Any, checkpoint: str | None) -> str | None:
        """Where a found module would be loaded from, if that is a place it may never come from."""
        cwds, trees, parents = self._blocked_dirs(checkpoint)
        roots = {_real(r) for r in self.roots if r}
        places = [spec.origin] if isinstance(getattr(spec, "origin", None), str) else []
        locations = getattr(spec, "submodule_search_locations", None) or []
        places += [os.path.join(p, "__init__.py") for p in locations]
        for place in places:
            if not os.path.isabs(place):
                continue  # "built-in", "frozen": not a file
            real = _real(place)
            holder = os.path.dirname(real)
            top = os.path.dirname(holder) if os.path.basename(real) == "__init__.py" else holder
            if any(_inside(real, t) for t in trees) or holder in parents or top in parents:
                return f"{place} (the checkpoint's directory)"
            if (holder in cwds or top in cwds) and not (holder in roots or top in roots):
                return f"{place} (the current directory)"
        return None

    # -- handing trust to a worker process ------------------------------------------------------
    def for_worker(self, factory_module: str | None) -> TrustPolicy:
        """What a validation worker may trust for a checkpoint whose factory is in
        ``factory_module``: this policy's list, that module if trusted here, and the directories
        this process imported them from."""
        modules = list(self.modules if self.only is None else self.only)
        if factory_module and self.refusal(factory_module) is None and not _covered(factory_module, modules):
            modules.append(factory_module)
        roots: list[str] = []
        for name in modules:
            for root in roots_of(name):
                if root not in roots:
                    roots.append(root)
        return TrustPolicy(tuple(modules), roots=tuple(roots))

    def to_doc(self) -> dict[str, list[str]]:
        return {"modules": list(self.modules), "roots": list(self.roots)}

    @classmethod
    def from_doc(cls, doc: Any, **fields: Any) -> TrustPolicy:
        """The policy a worker received (garbage in a field means nothing is trusted by it)."""
        doc = doc if isinstance(doc, dict) else {}
        lists = {k: doc.get(k) if isinstance(doc.get(k), list) else [] for k in ("modules", "roots")}
        strings = {k: tuple(str(v) for v in values if isinstance(v, str)) for k, values in lists.items()}
        return replace(cls(_names(strings["modules"]), roots=strings["roots"]), **fields)

    def to_env(self) -> dict[str, str]:
        return {ENV: ",".join(self.modules), ROOTS_ENV: os.pathsep.join(self.roots)}

    @classmethod
    def from_worker_env(cls) -> TrustPolicy:
        roots = tuple(p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p)
        return cls(parse_modules(os.environ.get(ENV, "")), roots=roots)


def roots_of(module: str) -> tuple[str, ...]:
    """The ``sys.path`` directories this process imported ``module``'s top package from (none
    when it is not imported)."""
    top = sys.modules.get(module.partition(".")[0])
    if top is None:
        return ()
    locations = [str(p) for p in (getattr(top, "__path__", None) or [])]
    if locations:
        return tuple(dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in locations))
    file = getattr(top, "__file__", None)
    return (os.path.dirname(os.path.abspath(file)),) if isinstance(file, str) else ()
