import os

import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")
# the test models are tiny: one intra-op thread is fastest and avoids oversubscription
torch.set_num_threads(int(os.environ.get("BNNPYRO_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
