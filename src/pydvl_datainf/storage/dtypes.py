"""Dtypes a gradient store keeps, and their numpy round trip.

Example:
    >>> import torch
    >>> resolve_store_dtype("bfloat16"), read_dtype(torch.bfloat16)
    (torch.bfloat16, torch.float32)
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import numpy as np
import torch

__all__ = [
    "STORE_DTYPES",
    "resolve_store_dtype",
    "read_dtype",
    "dtype_name",
    "numpy_dtype",
    "torch_to_numpy",
    "numpy_to_torch",
]

STORE_DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""Dtypes a [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore] can
keep gradients in. Half types halve the disk; reads return float32."""


def torch_to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Cast to the stored dtype and return numpy (bfloat16 as raw uint16 bits)."""
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray, stored: torch.dtype) -> torch.Tensor:
    """Back to torch, half types widened to float32."""
    if stored == torch.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16))
        return t.view(torch.bfloat16).to(torch.float32)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if stored == torch.float16:
        return t.to(torch.float32)
    return t


def read_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype reads return for a stored dtype: half types widen to float32."""
    return torch.float32 if stored in (torch.float16, torch.bfloat16) else stored


def numpy_dtype(stored: torch.dtype) -> str:
    """The numpy dtype of the Zarr array holding `stored` (bfloat16 as uint16)."""
    return {
        torch.float16: "float16",
        torch.bfloat16: "uint16",
        torch.float32: "float32",
        torch.float64: "float64",
    }[stored]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a store dtype in [STORE_DTYPES][pydvl_datainf.storage.STORE_DTYPES]."""
    for k, v in STORE_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"Unsupported store dtype {dtype}")


def resolve_store_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """`None`, a name from [STORE_DTYPES][pydvl_datainf.storage.STORE_DTYPES] or a
    torch dtype, checked.

    Raises:
        ValueError: not a store dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in STORE_DTYPES.values():
            raise ValueError(
                f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype}"
            )
        return dtype
    try:
        return STORE_DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(
            f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}"
        ) from None
