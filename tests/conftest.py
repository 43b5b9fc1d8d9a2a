import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("HOMOEXPORT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real models and data (../shared); tests that use it skip when it is absent."""
    if not (SHARED / "models" / "all-MiniLM-L6-v2" / "config.json").exists():
        pytest.skip(f"real data not found at {SHARED}")
    return SHARED
