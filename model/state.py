"""A steppable model's per-user state <-> bytes.

A state is a dict of tensors with the batch on dim 0 (`model.init_state(batch)`). One user's
row is stored as a 1-byte dtype tag followed by the raw values of every tensor, in sorted key
order; the shapes come from a template state, so nothing else is stored. fp16 halves the bytes
(see docs/RESULTS.md for the error it brings).
"""

from __future__ import annotations

import numpy as np
import torch

_TAGS = {torch.float32: 1, torch.float16: 2}
_DTYPES = {tag: dtype for dtype, tag in _TAGS.items()}


def state_size(template: dict[str, torch.Tensor]) -> int:
    """Floats per user."""
    return sum(t[0].numel() for t in template.values())


def state_to_bytes(state: dict[str, torch.Tensor], row: int, dtype=torch.float32) -> bytes:
    return states_to_bytes({k: v[row:row + 1] for k, v in state.items()}, dtype)[0]


def states_to_bytes(state: dict[str, torch.Tensor], dtype=torch.float32) -> list[bytes]:
    """Every row of a batched state, one conversion for the whole batch."""
    rows = next(iter(state.values())).shape[0]
    return rows_to_bytes(torch.cat([state[k].reshape(rows, -1) for k in sorted(state)], dim=1),
                         dtype)


def rows_to_bytes(flat: torch.Tensor, dtype=torch.float32) -> list[bytes]:
    """Rows already laid out as one (rows, state_size) block, keys in sorted order."""
    if dtype not in _TAGS:
        raise ValueError(f"unsupported storage dtype {dtype}")
    flat = flat.to(dtype).cpu().numpy()
    tag = bytes([_TAGS[dtype]])
    return [tag + flat[i].tobytes() for i in range(flat.shape[0])]


def states_from_bytes(blobs: list[bytes], template: dict[str, torch.Tensor], device=None):
    """Rebuild a batched fp32 state (one row per blob) shaped like `template`."""
    size = state_size(template)
    flat = torch.from_numpy(_values(blobs, size)) if blobs else torch.zeros(0, size)
    state, offset = {}, 0
    for key in sorted(template):
        shape = template[key].shape[1:]
        n = int(np.prod(shape)) if len(shape) else 1
        state[key] = flat[:, offset:offset + n].reshape(len(blobs), *shape).contiguous().to(
            device or template[key].device)
        offset += n
    return state


def _values(blobs: list[bytes], size: int) -> np.ndarray:
    """(rows, size) float32 from the blobs; one numpy conversion when they share a dtype."""
    tags = {blob[0] if blob else None for blob in blobs}
    lengths = {len(blob) for blob in blobs}
    if len(tags) == 1 and len(lengths) == 1:
        tag, length = tags.pop(), lengths.pop()
        if tag in _DTYPES and length == 1 + size * _itemsize(tag):
            rows = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), length)[:, 1:]
            return np.ascontiguousarray(rows).view(_np_dtype(tag)).astype(np.float32)
    out = np.empty((len(blobs), size), np.float32)       # mixed or bad blobs: check each
    for i, blob in enumerate(blobs):
        tag = blob[0] if blob else None
        if tag not in _DTYPES:
            raise ValueError(f"state blob {i}: unknown dtype tag {tag}")
        values = np.frombuffer(blob, dtype=_np_dtype(tag), offset=1)
        if values.size != size:
            raise ValueError(f"state blob {i}: {values.size} values, the model needs {size}")
        out[i] = values
    return out


def blob_fits(blob: bytes, template: dict[str, torch.Tensor]) -> bool:
    """A state blob of a known dtype with the template's number of values."""
    tag = blob[0] if blob else None
    return tag in _DTYPES and len(blob) == 1 + state_size(template) * _itemsize(tag)


def _np_dtype(tag: int):
    return np.float32 if _DTYPES[tag] is torch.float32 else np.float16


def _itemsize(tag: int) -> int:
    return np.dtype(_np_dtype(tag)).itemsize
