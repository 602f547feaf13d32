"""Shared pytest settings for the test suite."""

import torch

# The test models are tiny (a few hundred parameters): intra-op threads only add synchronization.
# Measured on the 2-core CI machine under load: building the dense references took 28 s with one
# thread and several minutes with two.
torch.set_num_threads(1)
