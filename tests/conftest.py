"""Shared fixtures. Tests run on one torch thread: the machine has two cores and tests run
beside other processes (uvicorn, redis-server)."""

import torch

torch.set_num_threads(1)
