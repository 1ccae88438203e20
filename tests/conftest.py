"""Test-wide setup. The Triton kernel runs CPU tensors under the interpreter, which
Triton reads when a kernel is defined: set it before anything imports anyms_kernels.
On a machine with a GPU the kernel runs for real and the interpreter stays off."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# One intra-op thread: tiny test shapes gain nothing from two, and on a loaded 2-core
# machine an OpenMP barrier waiting for a descheduled thread made small ops 10-40x slower.
torch.set_num_threads(1)


def pytest_configure(config):
    # `make test` runs everything, slow tests included (CI has the time); the GPU script
    # and quick local runs select `-m "not slow"`.
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core machine")
