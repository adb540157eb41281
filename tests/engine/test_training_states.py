"""Real training state round-trips exactly: models, optimizers, schedulers, every RNG."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tests.helpers import assert_exact

import ckptvault as cv


class TiedLM(torch.nn.Module):
    """A tiny language model whose output projection is tied to its embedding (like GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def _trained(optimizer_cls: type, **kwargs: object) -> dict[str, object]:
    torch.manual_seed(0)
    model = TiedLM()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(3):
        batch = torch.randint(0, 50, (8,))
        loss = torch.nn.functional.cross_entropy(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "numpy_generator": np.random.default_rng(7).bit_generator.state,
            "python": random.getstate(),
        },
        "step": 3,
    }


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (torch.optim.Adam, {"lr": 1e-3}),
        (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1, "amsgrad": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_training_state_round_trips_bit_for_bit(ckpt_dir: Path, optimizer_cls: type, kwargs: dict) -> None:
    state = _trained(optimizer_cls, **kwargs)
    cv.save(ckpt_dir / "step_3", state)
    back = cv.load(ckpt_dir / "step_3")
    assert_exact(state, back)
    # The restored pieces work: they load into fresh objects and training continues identically.
    model = TiedLM()
    model.load_state_dict(back["model"])
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    optimizer.load_state_dict(back["optimizer"])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])


def test_tied_weights_stay_tied_and_are_stored_once(ckpt_dir: Path) -> None:
    state = {"model": TiedLM().state_dict()}
    info = cv.save(ckpt_dir / "c", state)
    back = cv.load(ckpt_dir / "c")["model"]
    assert (
        back["embed.weight"].untyped_storage().data_ptr() == back["head.weight"].untyped_storage().data_ptr()
    )
    assert info.num_tensors == len(state["model"]) - 1  # the tied pair shares one stored tensor
    model = TiedLM()
    model.load_state_dict(back)
    assert model.head.weight is model.embed.weight


def test_views_of_one_storage_keep_offsets_strides_and_sharing(ckpt_dir: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    state = {"base": base, "row": base.view(4, 6)[1], "col": base.view(4, 6)[:, 2], "same": base}
    cv.save(ckpt_dir / "v", state)
    back = cv.load(ckpt_dir / "v")
    assert back["same"] is back["base"]  # one object saved twice is one object loaded
    assert back["col"].stride() == (6,) and back["col"].storage_offset() == 2
    back["base"][8] = -1.0  # index 8 lives in both row (1, 2) and col (1)
    assert back["row"][2] == -1.0 and back["col"][1] == -1.0


def test_small_view_of_a_big_buffer_stores_only_the_view(ckpt_dir: Path) -> None:
    big = torch.zeros(1_000_000)
    info = cv.save(ckpt_dir / "s", {"head": big[:10]})
    assert info.tensor_bytes == 40


def test_non_contiguous_tensor_keeps_values(ckpt_dir: Path) -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    cv.save(ckpt_dir / "n", {"t": t})
    back = cv.load(ckpt_dir / "n")["t"]
    assert torch.equal(back, t) and back.shape == t.shape


def test_parameters_and_requires_grad_survive(ckpt_dir: Path) -> None:
    state = {
        "p": torch.nn.Parameter(torch.ones(3)),
        "g": torch.ones(2, requires_grad=True),
        "f": torch.ones(1),
    }
    cv.save(ckpt_dir / "p", state)
    back = cv.load(ckpt_dir / "p")
    assert type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert back["g"].requires_grad and not back["f"].requires_grad


def test_data_files_open_unmodified_with_safetensors(ckpt_dir: Path) -> None:
    state = {
        "w": torch.randn(3, 4),
        "bf": torch.randn(5).to(torch.bfloat16),
        "f8": torch.randn(4).to(torch.float8_e5m2),
        "i": torch.arange(7, dtype=torch.int64),
        "u16": torch.arange(3, dtype=torch.int32).to(torch.uint16),
        "c": torch.randn(2, dtype=torch.complex64),
        "b": torch.tensor([True, False]),
        "a": np.arange(6, dtype=np.float64).reshape(2, 3),
    }
    cv.save(ckpt_dir / "s", state)
    files = sorted((ckpt_dir / "s").glob("*.safetensors"))
    assert files
    seen = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                seen[key] = handle.get_tensor(key)
    for key, value in state.items():
        expected = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        assert key in seen, f"{key} not found by safetensors"
        assert seen[key].dtype == expected.dtype and torch.equal(
            seen[key].view(torch.uint8), expected.contiguous().view(torch.uint8)
        )


def test_unsupported_values_name_their_path_and_leave_nothing(ckpt_dir: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: 0.9**epoch)
    state = {"scheduler": {"lr_lambdas": [scheduler.lr_lambdas[0]]}}
    with pytest.raises(cv.UnsupportedStateError) as caught:
        cv.save(ckpt_dir / "bad", state)
    assert "state['scheduler']['lr_lambdas'][0]" in str(caught.value)
    assert "function" in str(caught.value)
    assert list(ckpt_dir.iterdir()) == []
    with pytest.raises(cv.UnsupportedStateError, match=r"state\['m'\]"):
        cv.save(ckpt_dir / "bad", {"m": model})  # a module itself: save its state_dict() instead
    with pytest.raises(cv.UnsupportedStateError, match="cycle"):
        loop: list[object] = []
        loop.append(loop)
        cv.save(ckpt_dir / "bad", {"loop": loop})


def test_numpy_only_state_does_not_need_torch(ckpt_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, ckptvault as cv\n"
        "state = {'a': np.arange(5), 'g': np.random.default_rng(1).bit_generator.state}\n"
        f"cv.save({str(ckpt_dir / 'np')!r}, state)\n"
        f"back = cv.load({str(ckpt_dir / 'np')!r})\n"
        "assert (back['a'] == np.arange(5)).all()\n"
        "assert cv.verify(" + repr(str(ckpt_dir / "np")) + ").ok\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_tensors_sharing_only_an_allocation_are_stored_independently(ckpt_dir: Path, tmp_path: Path) -> None:
    # safetensors.load_file (and torch.load with mmap=True) return tensors that all live in one
    # file-sized storage without overlapping: they must be stored as ordinary named tensors.
    from safetensors.torch import load_file, save_file

    original = {"a.weight": torch.randn(8, 4), "b.weight": torch.randn(16), "c.bias": torch.zeros(0)}
    save_file(original, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    info = cv.save(ckpt_dir / "re", {"model": loaded})
    manifest = json.loads((ckpt_dir / "re" / "manifest.json").read_text())
    assert set(manifest["tensors"]) == {"model.a.weight", "model.b.weight", "model.c.bias"}
    assert info.tensor_bytes == 8 * 4 * 4 + 16 * 4
    assert_exact(loaded, cv.load(ckpt_dir / "re")["model"])
