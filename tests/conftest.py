import os

import matplotlib
import torch

matplotlib.use("Agg")
# the test models are tiny: one intra-op thread is fastest and avoids oversubscription
torch.set_num_threads(int(os.environ.get("BNNPYRO_TEST_THREADS", "1")))
