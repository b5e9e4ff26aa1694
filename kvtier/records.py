"""The on-disk record format: tensors as raw bytes with dtype and shape, metadata as JSON, each record checksummed.
No pickle: a record is `MAGIC | u32 header length | u32 header crc32 | header JSON | payload`, and the header holds
the payload's length and crc32. A span is one tensor record. Decoding checks every field and raises
CorruptCacheError naming the record."""
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
BIG_PAYLOAD = 1 << 20  # bytes: records with a larger payload are assembled by torch (see _pack)
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8)}


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, contiguous, without a copy when it already is."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _pack(header: dict[str, Any], payload: bytes | memoryview) -> bytes | memoryview:
    head = json.dumps(dict(header, length=len(payload)), separators=(",", ":"), sort_keys=True).encode()
    prefix = _PREFIX.pack(MAGIC, len(head), zlib.crc32(head)) + head
    if len(payload) < BIG_PAYLOAD:
        return b"".join((prefix, payload))
    # a large payload is copied by torch, which lets go of the GIL (bytes.join holds it for the whole memcpy), so the
    # disk tier's encoder threads and its LMDB writer overlap
    record = torch.empty(len(prefix) + len(payload), dtype=torch.uint8)
    record[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    record[len(prefix) :].copy_(torch.frombuffer(payload, dtype=torch.uint8))
    return memoryview(record.numpy())


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    return _pack(dict(header, crc32=zlib.crc32(payload)), payload)


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """A CPU tensor -> record bytes."""
    return encode({"kind": "tensor", "dtype": _dtype_name(tensor), "shape": list(tensor.shape)}, tensor_payload(tensor.cpu()))


def encode_json(data: Any) -> bytes:
    return encode({"kind": "json"}, json.dumps(data, sort_keys=True).encode())


def _dtype_name(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot store a {tensor.dtype} tensor; kvtier records hold {sorted(DTYPES)}")
    return name


def unpack(record: bytes | memoryview, name: str) -> tuple[dict[str, Any], memoryview]:
    """-> (header, payload view) with the header's checksum and the payload's length verified."""
    view = memoryview(record)
    header, start = _header(view, name)
    _check_length(header, len(view) - start, name)
    return header, view[start:]


def unpack_header(head: bytes | bytearray, payload_length: int, name: str) -> dict[str, Any]:
    """The header of a record from its first bytes, `head` (exactly its prefix and header), its payload of
    `payload_length` bytes read elsewhere -> the header, checksum and lengths verified."""
    header, start = _header(memoryview(head), name)
    if start != len(head):
        raise CorruptCacheError(f"record {name!r}: the header's length does not match the record's (the file is damaged)")
    _check_length(header, payload_length, name)
    return header


def _header(view: memoryview, name: str) -> tuple[dict[str, Any], int]:
    """A record's bytes (at least its prefix and header) -> (its header, checksum verified; where its payload starts)."""
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
    if not isinstance(header, dict):
        raise CorruptCacheError(f"record {name!r}: header is not a JSON object (the file is damaged)")
    return header, _PREFIX.size + head_len


def _check_length(header: dict[str, Any], payload_length: int, name: str) -> None:
    if payload_length != header.get("length"):
        raise CorruptCacheError(f"record {name!r}: the payload's length does not match its header (the file is damaged)")


def decode(record: bytes | memoryview, name: str) -> tuple[dict[str, Any], memoryview]:
    """-> (header, payload view), every length and checksum verified."""
    header, payload = unpack(record, name)
    if zlib.crc32(payload) != header.get("crc32"):
        raise CorruptCacheError(f"record {name!r}: payload checksum mismatch (the file is damaged)")
    return header, payload


def _tensor_layout(header: dict[str, Any], name: str) -> tuple[torch.dtype, list[int]]:
    """A tensor record's header -> (dtype, shape)."""
    dtype, shape = DTYPES.get(header.get("dtype")), header.get("shape")
    if header.get("kind") != "tensor" or dtype is None or not isinstance(shape, list):
        raise CorruptCacheError(f"record {name!r} does not describe a tensor")
    return dtype, shape


def decode_tensor(record: bytes | memoryview, name: str) -> torch.Tensor:
    """Record bytes -> a new CPU tensor (owning its memory)."""
    header, payload = decode(record, name)
    dtype, shape = _tensor_layout(header, name)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(payload):
        raise CorruptCacheError(f"record {name!r}: {len(payload)} bytes do not hold a {dtype} tensor of shape {shape}")
    out = torch.empty(shape, dtype=dtype)
    decode_into(payload, out)
    return out


def decode_tensor_into(record: bytes | memoryview, out: torch.Tensor, name: str) -> None:
    """Record bytes of a tensor of out's shape and dtype -> out (contiguous, on the host), every checksum verified."""
    header, payload = decode(record, name)
    _check_layout(header, out, name)
    decode_into(payload, out)


def check_tensor(header: dict[str, Any], out: torch.Tensor, name: str) -> None:
    """A tensor record's payload, already read into out (contiguous, on the host), against the record's header:
    shape, dtype and checksum."""
    _check_layout(header, out, name)
    if zlib.crc32(tensor_payload(out)) != header.get("crc32"):
        raise CorruptCacheError(f"record {name!r}: payload checksum mismatch (the file is damaged)")


def _check_layout(header: dict[str, Any], out: torch.Tensor, name: str) -> None:
    dtype, shape = _tensor_layout(header, name)
    if shape != list(out.shape) or dtype != out.dtype:
        raise CorruptCacheError(f"record {name!r} holds a {dtype} tensor {shape}, expected {out.dtype} {list(out.shape)}")


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
