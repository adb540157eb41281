"""How to rebuild a checkpoint's model without the training script: a factory reference + kwargs.

A checkpoint records ``{"factory": "package.module:Callable", "kwargs": {...}, "weights": [...]}``
in its metadata under ``"architecture"``: the callable that builds the model, JSON-encodable
keyword arguments, and the key path of the model's ``state_dict`` in the saved tree.

A factory reference in a checkpoint names code, and a checkpoint is untrusted input. So resolving
one imports only an installed module and accepts only a ``torch.nn.Module`` subclass or a function
marked with :func:`model_factory`: ``os:system`` or ``subprocess:run`` are refused before anything is
called. (Constructing an arbitrary ``nn.Module`` subclass of an installed package with JSON
arguments is the remaining trust; ``load_model(..., allowed_modules=...)`` narrows it to a list.)
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..format.strictjson import StrictJSONError, dumps

_REFERENCE = re.compile(
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


def resolve(reference: str, *, allowed_modules: Sequence[str] | None = None) -> Callable[..., Any]:
    """The callable a reference names, after the safety rules of the module docstring."""
    if not isinstance(reference, str) or not _REFERENCE.match(reference) or len(reference) > 512:
        raise ArchitectureError(
            f"bad factory reference {str(reference)[:100]!r}; expected 'package.module:name'"
        )
    module_name, _, attr_path = reference.partition(":")
    if allowed_modules is not None and not any(
        module_name == m or module_name.startswith(m + ".") for m in allowed_modules
    ):
        raise ArchitectureError(f"factory module {module_name!r} is not in allowed_modules")
    if any(part.startswith("__") for part in attr_path.split(".")):
        raise ArchitectureError(f"refusing dunder attribute in factory reference {reference!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # ImportError, AttributeError, or the module's own import-time failure
        raise ArchitectureError(f"cannot import model factory {reference!r}: {exc}") from exc
    import torch

    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    if callable(obj) and getattr(obj, _MARK, False) is True:
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
    built = resolve(reference)
    if isinstance(built, type) and not isinstance(model, built):
        raise ArchitectureError(f"{reference} does not build a {type(model).__qualname__}")
    return ModelSpec(reference, kwargs, weights)


def build(spec: ModelSpec, *, allowed_modules: Sequence[str] | None = None) -> Any:
    factory = resolve(spec.factory, allowed_modules=allowed_modules)
    try:
        return factory(**spec.kwargs)
    except Exception as exc:
        raise ArchitectureError(f"{spec.factory}(**{spec.kwargs!r}) failed: {exc}") from exc


def check_fit(model: Any, weights: dict[str, Any]) -> None:
    """Raises :class:`ModelMismatchError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: saved {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ModelMismatchError(missing, unexpected, shapes)
