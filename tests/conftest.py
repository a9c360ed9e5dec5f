"""Suite-wide settings. Under pytest-xdist (the README's command runs one worker per core) each worker computes
with one thread, so that the workers do not contend for the cores."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
