"""Which of a model's tensors travel to the server, and how they come back.

The federation exchanges a flat ``name -> numpy array`` dict. Batch-norm step counters never
travel (they are integers that averaging would corrupt). With FedBN, every tensor of a
normalisation layer stays at the site; those are chosen by module type, not by name.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.models.factory import norm_layer_types


def local_norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to normalisation layers (kept at the site under FedBN)."""
    types = norm_layer_types()
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, types):
            prefix = f"{module_name}." if module_name else ""
            keys.update(prefix + k for k in module.state_dict().keys())
    return keys


def shared_keys(model: nn.Module, fedbn: bool) -> list[str]:
    """State-dict keys exchanged with the server, in a stable order."""
    skip = local_norm_keys(model) if fedbn else set()
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and k not in skip]


def get_shared_state(model: nn.Module, fedbn: bool, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The exchanged tensors as numpy arrays (float16 on the wire when ``dtype='float16'``)."""
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for key in shared_keys(model, fedbn):
        # C order whatever the tensor's memory layout (conv weights are channels-last).
        array = np.asarray(state[key].detach().cpu().numpy(), order="C")
        out[key] = array.astype(np.float16) if dtype == "float16" and array.dtype == np.float32 else array
    return out


def set_shared_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load exchanged arrays into ``model`` (cast back to each tensor's dtype).

    Raises ValueError naming the keys when ``arrays`` does not match the model.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise ValueError(f"weights carry {len(unknown)} unknown tensors, e.g. {unknown[:3]}")
    for key, array in arrays.items():
        if tuple(array.shape) != tuple(state[key].shape):
            raise ValueError(
                f"tensor {key} has shape {tuple(array.shape)}, model expects {tuple(state[key].shape)}"
            )
        state[key] = torch.from_numpy(np.asarray(array)).to(state[key].dtype)
    model.load_state_dict(state)


def get_local_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Normalisation-layer tensors (what FedBN keeps at the site)."""
    state = model.state_dict()
    return {k: np.asarray(state[k].detach().cpu().numpy(), order="C") for k in sorted(local_norm_keys(model))}
