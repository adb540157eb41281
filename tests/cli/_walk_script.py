"""A numpy-only training script for ``check-resume`` (fast to start: no torch).

``exact``: every RNG seeded and every part of the state in the TrainState -- resumes exactly.
``unseeded``: numpy's global RNG is never seeded -- two uninterrupted runs already differ.
``forgetful``: deterministic, but a counter that shapes training is kept outside the TrainState --
two uninterrupted runs agree, a resumed one does not."""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import numpy as np

import ckptvault as cv

STEPS = 150


class Walk:
    def __init__(self) -> None:
        self.w = np.zeros(4)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].copy()


def main() -> None:
    mode = sys.argv[1]
    random.seed(0)
    if mode != "unseeded":
        np.random.seed(0)
    walk, forgotten = Walk(), 0
    state = cv.TrainState(extras={"walk": walk})
    with cv.CheckpointManager(every_n_steps=5, keep_last=2) as manager:
        manager.restore(state)
        while state.step < STEPS:
            walk.w += np.random.standard_normal(4)
            if mode == "forgetful":
                forgotten += 1
                walk.w += forgotten * 1e-3
            time.sleep(0.004)  # a step takes time, so kills land mid-run
            manager.step(state)
        manager.save(state)


if __name__ == "__main__":
    main()
