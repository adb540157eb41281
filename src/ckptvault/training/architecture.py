"""How to rebuild a checkpoint's model without the training script: a factory reference + kwargs.

A checkpoint records ``{"factory": "package.module:Callable", "kwargs": {...}, "weights": [...]}``
in its metadata under ``"architecture"``: the callable that builds the model, JSON-encodable
keyword arguments, and the key path of the model's ``state_dict`` in the saved tree.

A factory reference in a checkpoint names code, and a checkpoint is untrusted input. So resolving
one imports a module only when the program trusts it (imported already, or allow-listed; see
:mod:`ckptvault.training.trust`), never from the current directory or the checkpoint's own
directories, and accepts only a ``torch.nn.Module`` subclass or a function marked with
:func:`model_factory`: ``os:system`` or ``subprocess:run`` are refused before anything is called.
Attributes are looked up statically (no module ``__getattr__`` or descriptor runs). Anything raised
while importing or constructing -- ``SystemExit`` and other ``BaseException`` s included, except a
``KeyboardInterrupt``, which is the user's -- becomes an :class:`ArchitectureError`. (Constructing an
``nn.Module`` subclass of a trusted module with JSON arguments is the remaining trust.)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..format.strictjson import StrictJSONError, dumps
from .trust import TrustPolicy

# A factory reference, ``package.module:qualified.name``. Public: the validation worker checks a
# recorded module with it before it imports anything.
REFERENCE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)
_MARK = "__ckptvault_model_factory__"
F = TypeVar("F", bound=Callable[..., Any])


class ArchitectureError(CheckpointError):
    """The model cannot be rebuilt: no or bad factory reference, import failure, refused callable."""


class ModelMismatchError(CheckpointError):
    """The saved weights do not fit the rebuilt model; the message lists every difference."""

    def __init__(self, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:20]}")
        super().__init__("weights do not fit the model: " + "; ".join(parts))
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes


def model_factory(func: F) -> F:
    """Marks a function as a model factory that a checkpoint may name (a class needs no mark)."""
    setattr(func, _MARK, True)
    return func


@dataclass(frozen=True)
class ModelSpec:
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: tuple[str, ...] = ("model", "model")

    def to_metadata(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs), "weights": list(self.weights)}

    @classmethod
    def from_metadata(cls, doc: Any) -> ModelSpec:
        if not isinstance(doc, dict) or not isinstance(doc.get("factory"), str):
            raise ArchitectureError("the checkpoint records no model factory (metadata 'architecture')")
        kwargs, weights = doc.get("kwargs", {}), doc.get("weights", ["model", "model"])
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ArchitectureError("architecture kwargs must be a dict with string keys")
        if not isinstance(weights, list) or not all(isinstance(k, str) for k in weights):
            raise ArchitectureError("architecture weights must be a list of keys")
        return cls(doc["factory"], dict(kwargs), tuple(weights))


def reference_of(obj: Any) -> str:
    """``module:qualname`` of a module-level class or function, refused when not importable by name."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname:
        raise ArchitectureError(f"{obj!r} is not defined at module level; pass model_factory='module:name'")
    if module == "__main__":
        raise ArchitectureError(
            f"{qualname} is defined in the script being run (__main__), which another process cannot import; "
            "move it to a module or pass model_factory='module:name'"
        )
    return f"{module}:{qualname}"


_IMPORT_LOCK = threading.Lock()


def _typed(exc: BaseException, message: str) -> ArchitectureError:
    """``exc`` as an ArchitectureError; a KeyboardInterrupt (the user's Ctrl-C) is raised as is."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return ArchitectureError(f"{message}: {type(exc).__name__}: {str(exc)[:500]}")


def import_trusted(module_name: str, policy: TrustPolicy, checkpoint: str | None = None) -> Any:
    """``module_name``, imported only as :mod:`ckptvault.training.trust` allows.

    Refused (ArchitectureError saying how to trust it) unless trusted; when not imported yet, each
    package level is located first on :meth:`TrustPolicy.import_path` and refused when it lies in
    the current directory or the checkpoint's, then imported without writing bytecode. ``sys.path``
    is restored afterwards (keeping what the module itself added).
    """
    refusal = policy.refusal(module_name)
    if refusal is not None:
        raise ArchitectureError(refusal)
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        return loaded
    with _IMPORT_LOCK:
        saved, bytecode = list(sys.path), sys.dont_write_bytecode
        allowed = policy.import_path(checkpoint)
        try:
            sys.path[:] = allowed
            sys.dont_write_bytecode = True  # never a __pycache__ beside code a checkpoint named
            importlib.invalidate_caches()
            parts = module_name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if sys.modules.get(name) is not None:
                    continue
                found = importlib.util.find_spec(name)
                if found is None:
                    raise ModuleNotFoundError(f"no module named {name!r} on the program's path")
                where = policy.forbidden_origin(found, checkpoint)
                if where is not None:
                    raise ImportError(f"{name} would be loaded from {where}")
                importlib.import_module(name)
            return sys.modules[module_name]
        except BaseException as exc:
            raise _typed(
                exc,
                f"cannot import model factory module {module_name!r} (a trusted module is imported "
                "from the program's own path only, never from the current directory or the "
                "checkpoint's directories)",
            ) from exc
        finally:
            added = [p for p in sys.path if p not in allowed and p not in saved]
            sys.path[:] = saved + added
            sys.dont_write_bytecode = bytecode


def resolve(
    reference: str,
    policy: TrustPolicy | None = None,
    *,
    allowed_modules: Sequence[str] | None = None,
    checkpoint: str | None = None,
) -> Callable[..., Any]:
    """The callable a reference names, after the safety rules of the module docstring.

    ``policy`` says which modules may be imported (default: :meth:`TrustPolicy.create`, that is
    already imported ones and ``CKPTVAULT_TRUSTED_MODULES``); ``allowed_modules`` narrows it to a
    list; ``checkpoint`` is the directory whose files must never be imported.
    """
    if not isinstance(reference, str) or not REFERENCE.match(reference) or len(reference) > 512:
        raise ArchitectureError(
            f"bad factory reference {str(reference)[:100]!r}; expected 'package.module:name'"
        )
    module_name, _, attr_path = reference.partition(":")
    if policy is None:
        policy = TrustPolicy.create(None, allowed_modules)
    elif allowed_modules is not None:
        policy = dataclasses.replace(policy, only=TrustPolicy.create([], allowed_modules).only)
    if policy.only is not None and policy.refusal(module_name) is not None:
        raise ArchitectureError(str(policy.refusal(module_name)))
    if any(part.startswith("__") for part in attr_path.split(".")):
        raise ArchitectureError(f"refusing dunder attribute in factory reference {reference!r}")
    obj: Any = import_trusted(module_name, policy, checkpoint)
    try:
        for part in attr_path.split("."):
            obj = inspect.getattr_static(obj, part)  # no module __getattr__, no descriptor runs
    except AttributeError as exc:
        raise ArchitectureError(f"cannot import model factory {reference!r}: {exc}") from exc
    import torch

    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    if callable(obj) and inspect.getattr_static(obj, _MARK, False) is True:
        return obj  # type: ignore[no-any-return]
    raise ArchitectureError(
        f"{reference!r} is neither a torch.nn.Module subclass nor a function marked with "
        "@ckptvault.model_factory; refusing to call it"
    )


def spec_for(
    model: Any,
    factory: str | Callable[..., Any] | None,
    kwargs: dict[str, Any] | None,
    weights: tuple[str, ...],
) -> ModelSpec:
    """The spec to record for ``model``, checked now (importable, JSON kwargs) so that a broken
    reference fails the run's first save instead of the day someone needs the checkpoint."""
    if factory is None:
        declared = getattr(model, "ckptvault_kwargs", None)
        if kwargs is None and declared is None:
            raise ArchitectureError(
                "give model_kwargs (or a ckptvault_kwargs attribute on the model) to infer the factory"
            )
        kwargs = dict(kwargs if kwargs is not None else declared)  # type: ignore[arg-type]
        reference = reference_of(type(model))
    else:
        reference = factory if isinstance(factory, str) else reference_of(factory)
        kwargs = dict(kwargs or {})
    if not all(isinstance(key, str) for key in kwargs):
        raise ArchitectureError("model kwargs must have string keys (they become keyword arguments)")
    try:
        dumps(kwargs)
    except (StrictJSONError, TypeError, ValueError) as exc:
        raise ArchitectureError(f"model kwargs must be JSON-encodable: {exc}") from exc
    # The program names this reference itself (no checkpoint does): its module is trusted, and may
    # come from the current directory, as the program's own imports may.
    own = TrustPolicy((reference.partition(":")[0],), roots=(os.getcwd(),))
    built = resolve(reference, own)
    if isinstance(built, type) and not isinstance(model, built):
        raise ArchitectureError(f"{reference} does not build a {type(model).__qualname__}")
    return ModelSpec(reference, kwargs, weights)


def construct(factory: Callable[..., Any], spec: ModelSpec, *, device: str | None = None) -> Any:
    """``factory(**kwargs)`` (under ``torch.device(device)`` when given); anything it raises but a
    KeyboardInterrupt, and a result that is not a module, is an ArchitectureError."""
    import torch

    try:
        if device is None:
            model = factory(**spec.kwargs)
        else:
            with torch.device(device):
                model = factory(**spec.kwargs)
    except BaseException as exc:
        raise _typed(exc, f"{spec.factory}(**{str(spec.kwargs)[:200]}) failed") from exc
    if not isinstance(model, torch.nn.Module):
        raise ArchitectureError(f"{spec.factory} built a {type(model).__qualname__}, not a torch.nn.Module")
    return model


def build(
    spec: ModelSpec, *, allowed_modules: Sequence[str] | None = None, policy: TrustPolicy | None = None
) -> Any:
    return construct(resolve(spec.factory, policy, allowed_modules=allowed_modules), spec)


def check_shapes(model: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...] | None]) -> None:
    """Raises :class:`ModelMismatchError` listing missing/unexpected keys and shape mismatches
    between a model's state-dict shapes and the saved ones (``None``: a shape that is not one)."""
    missing = sorted(set(model) - set(saved))
    unexpected = sorted(set(saved) - set(model))
    common = sorted(set(model) & set(saved))
    shapes = [f"{k}: saved {saved[k]} vs model {model[k]}" for k in common if saved[k] != model[k]]
    if missing or unexpected or shapes:
        raise ModelMismatchError(missing, unexpected, shapes)


def state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}


def check_fit(model: Any, weights: dict[str, Any]) -> None:
    """Raises :class:`ModelMismatchError` listing missing/unexpected keys and shape mismatches."""
    check_shapes(state_shapes(model.state_dict()), state_shapes(weights))
