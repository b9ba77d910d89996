"""Test-suite wide settings."""

import torch

# Small matrices on a 2-core machine: intra-op threads only add contention (a 64x64
# matmul measured 2000x slower with 2 threads while another process was busy).
torch.set_num_threads(1)
