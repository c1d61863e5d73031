import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real public data (ScienceQA, LLaVA-Bench, photos); .ci/run sets LLAVA_DRIP_DATA."""
    root = os.environ.get("LLAVA_DRIP_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("LLAVA_DRIP_DATA is not set or missing (it points at ../shared/data in CI)")
    return Path(root)
