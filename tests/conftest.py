"""Suite-wide settings: tiny models run fastest on one thread, and several tests may share the machine."""

import os

import torch

torch.set_num_threads(1)
# DeepSpeed's CPU accelerator, chosen explicitly: auto-detected, DeepSpeed announces it on stdout at import.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
