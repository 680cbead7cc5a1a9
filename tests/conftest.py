from __future__ import annotations

from pathlib import Path

import pytest

from ddad.data.synth import SynthConfig, generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(size=32, train=8, test_good=3, test_defective_per_type=2, seed=0))
    return root


def interrupt_on_call(monkeypatch, module, name: str, call: int):
    """``module.name`` replaced by one that raises KeyboardInterrupt (Ctrl-C) on its ``call``-th call and
    otherwise calls the original, which is returned."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return real


def forbid_reading(monkeypatch, files, when: str):
    """Reading any of ``files`` through ddad's image reader fails the test (saying ``when``); returns the
    real reader."""
    from ddad.data import dataset

    forbidden, real = {str(f) for f in files}, dataset.read_image

    def guarded(path, *args, **kwargs):
        assert str(path) not in forbidden, f"test image {path} read {when}"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "read_image", guarded)
    return real
