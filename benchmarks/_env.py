"""What every benchmark result names: the machine and the commit it came from."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD, '-dirty' with uncommitted changes to tracked files; ANYMS_COMMIT where .git
    did not travel (the GPU machine gets a copy of the tree without it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ANYMS_COMMIT", "unknown")
