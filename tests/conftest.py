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
