"""PyTorch backend (CPU, through array-api-compat): proves the math on a second real library."""

from arraygpt.xp import BackendUnavailable

try:
    import torch
except ImportError as e:
    raise BackendUnavailable("the torch backend needs PyTorch: pip install torch") from e

import array_api_compat.torch as xp  # noqa: F401  (the Backend field)

name = "torch"
array_type = torch.Tensor
device = torch.device("cpu")


def asarray(host_array):
    return torch.from_numpy(host_array.copy())


def to_numpy(x):
    return x.detach().cpu().numpy()


def scatter_add(target, indices, values):
    target.index_add_(0, torch.as_tensor(indices, dtype=torch.int64).reshape(-1), values)


def synchronize():
    pass
