import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def digits_assets(tmp_path_factory):
    """The trained digits CNN sample with its calibration and evaluation .npz files (built once per session)."""
    from samples.digits.digits_cnn import build

    return build(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (deterministic CPU kernels, and the box's other core stays free)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
