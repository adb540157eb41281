"""L3: the old home of restore's skip reporting, now :mod:`ckptvault.manager.restore`.

Kept because ``from ckptvault.restore_skips import RestoreRefusedError`` is documented (README) and
used by scripts; everything here is re-exported from there.
"""

from __future__ import annotations

from .manager.restore import RestoreRefusedError as RestoreRefusedError
from .manager.restore import Skip as Skip
from .manager.restore import refuse_fresh_start as refuse_fresh_start
from .manager.restore import warn_skipped as warn_skipped
from .manager.restore import why_invalid as why_invalid

__all__ = ["RestoreRefusedError", "Skip", "refuse_fresh_start", "warn_skipped", "why_invalid"]
