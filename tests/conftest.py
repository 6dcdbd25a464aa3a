import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a 2-core CI machine: extra OpenMP threads only add contention (results are the
    same; every test module runs single-threaded and restores the setting afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
