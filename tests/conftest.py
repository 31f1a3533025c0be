"""Suite-wide settings: tiny models run fastest on one thread, and several tests may share the machine."""

import torch

torch.set_num_threads(1)
