"""Where an LMDB value lies in its data file, so that it can be read back with one pread of exactly its bytes.

LMDB stores a value larger than about half a page in its own run of overflow pages, which are never moved or
rewritten while the value lives (copy-on-write touches only the pages a transaction changes). The run starts with
a page header, `MDB_page`: on 64-bit builds the page number (8 bytes), a pad (2), the flags (2, P_OVERFLOW = 0x04)
and the page count (4); the value follows at byte 16. A value returned by a read transaction points into LMDB's
memory map, so the 16 bytes before it are that header. Smaller values sit inside leaf pages, which move when a
later write copies them: for those there is no fixed place (None)."""
from __future__ import annotations

import ctypes
import struct

import numpy as np

OVERFLOW_HEADER = struct.Struct("<QHHI")  # mp_pgno, mp_pad, mp_flags, mp_pages
P_OVERFLOW = 0x04


def file_offset(value: memoryview, page_size: int) -> int | None:
    """A value read from LMDB (a memoryview into the map, inside its read transaction) -> the byte of the data file
    where it starts, or None when it is not stored in overflow pages."""
    if not len(value):
        return None
    start = np.frombuffer(value, dtype=np.uint8).ctypes.data - OVERFLOW_HEADER.size
    if start % page_size:
        return None
    page, _, flags, _ = OVERFLOW_HEADER.unpack(ctypes.string_at(start, OVERFLOW_HEADER.size))
    if not flags & P_OVERFLOW:
        return None
    return page * page_size + OVERFLOW_HEADER.size
