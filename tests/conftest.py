import os

import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")
# the test models are tiny: one intra-op thread is fastest and avoids oversubscription
torch.set_num_threads(int(os.environ.get("BNNPYRO_TEST_THREADS", "1")))


# the global seed every test starts from; another value (BNNPYRO_TEST_SEED=1 pytest) re-draws the
# Monte Carlo tests' samples, to check that their tolerances hold beyond one draw
SEED = int(os.environ.get("BNNPYRO_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    yield
    pyro.clear_param_store()
