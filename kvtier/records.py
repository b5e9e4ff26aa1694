"""The on-disk record format: tensors as raw bytes with dtype and shape, metadata as JSON, each record checksummed.
No pickle: a record is `MAGIC | u32 header length | u32 header crc32 | header JSON | payload`, and the header holds
the payload's length and crc32. Decoding checks every field and raises CorruptCacheError naming the record."""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import torch

from kvtier.errors import CorruptCacheError

MAGIC = b"KVT1"
_PREFIX = struct.Struct("<4sII")  # magic, header length, header crc32
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8)}


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, contiguous, without a copy when it already is."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    header = dict(header, length=len(payload), crc32=zlib.crc32(payload))
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((_PREFIX.pack(MAGIC, len(head), zlib.crc32(head)), head, payload))


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """A CPU tensor -> record bytes."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot store a {tensor.dtype} tensor; kvtier records hold {sorted(DTYPES)}")
    return encode({"kind": "tensor", "dtype": name, "shape": list(tensor.shape)}, tensor_payload(tensor.cpu()))


def encode_json(data: Any) -> bytes:
    return encode({"kind": "json"}, json.dumps(data, sort_keys=True).encode())


def decode(record: bytes | memoryview, name: str) -> tuple[dict[str, Any], memoryview]:
    """-> (header, payload view), every length and checksum verified."""
    view = memoryview(record)
    if len(view) < _PREFIX.size:
        raise CorruptCacheError(f"record {name!r} is truncated ({len(view)} bytes)")
    magic, head_len, head_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptCacheError(f"record {name!r} is not a kvtier record (magic {bytes(magic)!r})")
    head = view[_PREFIX.size : _PREFIX.size + head_len]
    if len(head) != head_len or zlib.crc32(head) != head_crc:
        raise CorruptCacheError(f"record {name!r}: header checksum mismatch (the file is damaged)")
    try:
        header = json.loads(bytes(head))
    except ValueError:
        raise CorruptCacheError(f"record {name!r}: header is not JSON") from None
    payload = view[_PREFIX.size + head_len :]
    if len(payload) != header.get("length") or zlib.crc32(payload) != header.get("crc32"):
        raise CorruptCacheError(f"record {name!r}: payload checksum mismatch (the file is damaged)")
    return header, payload


def decode_tensor(record: bytes | memoryview, name: str) -> torch.Tensor:
    """Record bytes -> a new CPU tensor (owning its memory)."""
    header, payload = decode(record, name)
    dtype, shape = DTYPES.get(header.get("dtype")), header.get("shape")
    if header.get("kind") != "tensor" or dtype is None or not isinstance(shape, list):
        raise CorruptCacheError(f"record {name!r} does not describe a tensor")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(payload):
        raise CorruptCacheError(f"record {name!r}: {len(payload)} bytes do not hold a {dtype} tensor of shape {shape}")
    out = torch.empty(shape, dtype=dtype)
    decode_into(payload, out)
    return out


def decode_into(payload: memoryview, out: torch.Tensor) -> None:
    """Copy a verified payload into a contiguous CPU tensor of exactly its size (e.g. a pinned host slot)."""
    out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)


def decode_json(record: bytes | memoryview, name: str) -> Any:
    header, payload = decode(record, name)
    if header.get("kind") != "json":
        raise CorruptCacheError(f"record {name!r} is not a JSON record")
    try:
        return json.loads(bytes(payload))
    except ValueError:
        raise CorruptCacheError(f"record {name!r}: payload is not JSON") from None
