"""L3: one stream's configuration -- when to save one kind of checkpoint and which of them to keep.

:class:`Scope` is the single list of a stream's options (issue 14 item 4: its fields used to be
written three times). :class:`~ckptvault.manager.CheckpointManager` takes the full scope's options
as keyword arguments and checks their names against the dataclass's fields here
(:func:`full_scope`), so a new option is one new field, and a misspelt one fails as Python's own
keyword check would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..policy import RetentionPolicy, TriggerPolicy, TriggerState

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Scope:
    """When to save one kind of checkpoint and which of them to keep.

    The manager's own keyword arguments (or ``full=Scope(...)``) configure the ``full`` scope;
    ``weights=Scope(...)`` adds a weights-only stream with its own triggers and retention (the
    seed's recipe: a full checkpoint every 10 epochs, a weights-only one every epoch, only the top 3
    by validation accuracy kept).
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    every: Literal["auto"] | None = None
    mtbf_seconds: float | None = None
    save_on_improvement: bool = False
    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Mode = "min"
    keep_every_n_steps: int | None = None
    keep_every_n_epochs: int | None = None
    keep_newer_than: float | None = None

    def triggers(self) -> TriggerPolicy:
        if self.every == "auto" and not self.mtbf_seconds:
            raise ValueError('every="auto" needs mtbf_seconds (the mean time between failures)')
        return TriggerPolicy(
            every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs,
            every_seconds=self.every_seconds,
            on_improvement=self.save_on_improvement,
            monitor=self.monitor,
            mode=self.mode,
            auto_mtbf_seconds=self.mtbf_seconds if self.every == "auto" else None,
        )

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            monitor=self.monitor,
            mode=self.mode,
            keep_every_n_steps=self.keep_every_n_steps,
            keep_every_n_epochs=self.keep_every_n_epochs,
            keep_newer_than=self.keep_newer_than,
        )


SCOPE_OPTIONS = frozenset(f.name for f in dataclasses.fields(Scope))
"""The names :class:`Scope` accepts: the only list of a stream's options."""


def full_scope(full: Scope | None, options: Mapping[str, Any], *, caller: str = "CheckpointManager") -> Scope:
    """The full scope from ``full=Scope(...)`` or from keyword ``options`` named like its fields.

    An unknown name raises ``TypeError`` worded as Python words its own ("got an unexpected keyword
    argument"), so a misspelt option never silently configures nothing; giving both forms is
    ambiguous and raises too."""
    unknown = sorted(set(options) - SCOPE_OPTIONS)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if full is not None:
        if options:
            raise TypeError(
                f"{caller}() takes the full scope as full=Scope(...) or as keyword arguments, not both "
                f"(got full= and {', '.join(sorted(options))})"
            )
        return full
    return Scope(**options)


@dataclass
class Stream:
    """One configured scope at run time: its policies and its trigger state (best-so-far, last save)."""

    scope: str
    config: Scope
    triggers: TriggerPolicy
    retention: RetentionPolicy
    state: TriggerState = field(default_factory=TriggerState)

    @classmethod
    def of(cls, scope: str, config: Scope) -> Stream:
        return cls(scope, config, config.triggers(), config.retention())
