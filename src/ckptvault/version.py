"""L0: the package version, in a module of its own.

It lives here rather than in the package root so that lower layers (the sidecar records it in every
checkpoint) can read it without importing ``ckptvault`` itself, which imports every layer.
"""

from __future__ import annotations

__version__ = "0.1.0"
