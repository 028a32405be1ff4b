"""Where the learner's models and tensors live, and in which precision they compute.

One rule for every stage (reward model, PPO, gate; SFT gets the same through its
Trainer's options):

  - CPU: float32 weights, float32 arithmetic (exactly what the learner did before it
    knew about devices);
  - CUDA: float32 weights, forward passes under bf16 autocast. The matrix products run
    in bf16 on the tensor cores while the weights, the optimizer state and the saved
    checkpoints stay float32: AdamW steps of ~1e-5 relative size would vanish in bf16
    weights (8 significant bits), and the server loads the checkpoint as it was saved.
    Losses, log-probs and values are read in float32 (ppo.py and reward.py cast them).

Imports torch; learner/config.py (which must stay light) only holds the option's name.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto': cuda when available, else cpu; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s)")
    return device


# The dtype forward passes compute in, per device type; a type not listed computes in
# float32 (no autocast). A test adds "cpu" here to run the CUDA path on a machine without one.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"cuda": torch.bfloat16}


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op context on CPU (float32 stays float32). See
    AUTOCAST_DTYPES."""
    device_type = torch.device(device).type
    dtype = AUTOCAST_DTYPES.get(device_type)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
