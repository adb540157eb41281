"""Helper process for test_concurrency.py (not a test module).

``race <base> <worker> <rounds>``: for each round r, announces ``<base>/ready<r>.<worker>``, spins
until ``<base>/go<r>`` exists, then saves ``make_state(worker, r)`` to ``<base>/round<r>/ckpt``
and prints ``<r> ok`` or ``<r> err <ErrorType> <message>``.

``reader <target> <stop>``: loads ``<target>`` in a loop until ``<stop>`` exists; each load must be
exactly state "A" or state "B" (``overwrite_state``). Creates ``<stop>.ready`` after the first load.
Prints one JSON line: counts per state, errors and mixed loads.
"""

import json
import os
import sys
import time

import numpy as np

import ckptvault


def make_state(worker, round_):
    rng = np.random.default_rng(1000 * worker + round_)
    return {
        "writer": worker,
        "round": round_,
        "weights": [rng.standard_normal((128, 256)).astype(np.float32) for _ in range(12)],
        "bias": rng.standard_normal(256),
    }


def overwrite_state(tag):
    rng = np.random.default_rng(ord(tag))
    return {
        "tag": tag,
        "layers": {f"l{i}": rng.standard_normal((64, 256)).astype(np.float32) for i in range(12)},
        "step": ord(tag),
    }


def same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def race(base, worker, rounds):
    for r in range(rounds):
        open(os.path.join(base, f"ready{r}.{worker}"), "w").close()
        go = os.path.join(base, f"go{r}")
        state = make_state(worker, r)
        while not os.path.exists(go):
            time.sleep(0.0002)
        try:
            ckptvault.save(os.path.join(base, f"round{r}", "ckpt"), state)
            print(f"{r} ok", flush=True)
        except Exception as exc:
            print(f"{r} err {type(exc).__name__} {str(exc)[:300]!r}", flush=True)


def reader(target, stop):
    expected = {tag: overwrite_state(tag) for tag in "AB"}
    counts = {"A": 0, "B": 0}
    errors, mixed = [], 0
    while not os.path.exists(stop):
        try:
            loaded = ckptvault.load(target)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            tag = loaded.get("tag") if isinstance(loaded, dict) else None
            if tag in expected and same(loaded, expected[tag]):
                counts[tag] += 1
            else:
                mixed += 1
        if not os.path.exists(stop + ".ready"):
            open(stop + ".ready", "w").close()
    print(json.dumps({"counts": counts, "errors": errors[:20], "n_errors": len(errors), "mixed": mixed}))


if __name__ == "__main__":
    if sys.argv[1] == "race":
        race(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        reader(sys.argv[2], sys.argv[3])
