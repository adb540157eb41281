"""The second process of tests/storage/test_contract_join.py: a rank that joins a local save by its
token alone and writes one file. Its own module, imported by its package name, so a ``spawn``-ed
child can import it (the test modules are imported by pytest's importlib mode under other names)."""

from __future__ import annotations

from ckptvault.storage.local import LocalStorage


def rank_data(size: int) -> bytes:
    return bytes((i * 131 + (i >> 9)) % 256 for i in range(size))


def rank_main(root: str, target: str, token: str, name: str, size: int) -> None:
    participant = LocalStorage(root).join_transaction(target, token)
    out = participant.create(name, size_hint=size)
    out.write(rank_data(size))
    out.close()
