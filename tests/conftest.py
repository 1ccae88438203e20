"""Test-wide setup. The Triton kernel runs CPU tensors under the interpreter, which
Triton reads when a kernel is defined: set it before anything imports anyms_kernels.
On a machine with a GPU the kernel runs for real and the interpreter stays off."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
