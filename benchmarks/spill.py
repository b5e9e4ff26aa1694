"""Disk-tier benchmark: how fast spans spilled to LMDB leave the host (kvtier.tiers.disk.LmdbStore.put, from the call
to the commit), against ceilings measured in the same run on the same folder: LMDB's own put of ready-made records
(a record per span, a batch of records per transaction, as the writer does) and the checksum + assembly of those
records (encode_each); and how fast they come back (LmdbStore.get_into of random batches of spans, as a decode
step's layers ask for them): cold, a random 1/8 of them from the disk (the file's cached pages dropped with
posix_fadvise first) with the bytes the disk read for them (Linux), then warm, all of them from the page cache.
Spans of the Llama-3.1-8B shape (2 x 8 KV heads x 32 tokens x 128, bf16: 128 KiB each) unless --quick. Writes
spill.json and spill.png (GB/s per stage) into --out; prints the table last.

    python benchmarks/spill.py --gib 4 --dir /tmp --out $OUT/spill    # the writer at 4 GiB of spans
    python benchmarks/spill.py --read-path lmdb             # reads through LMDB transactions instead of pread
    python benchmarks/spill.py --quick                      # tiny shapes, a few MiB (CI)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtier.tiers.disk import WRITE_BATCH_BYTES, LmdbStore, encode_each, put_records
from kvtier.tools.args import positive
from kvtier.tools.output import default_out, print_report, unwind_on_sigterm, write_json
from kvtier.tools.plots import bar_chart

SPAN_SHAPE = (2, 8, 32, 128)  # one span of the Llama-3.1-8B shape: K and V, Hkv, S, D
QUICK_SPAN_SHAPE = (2, 2, 8, 16)
PUT_SPANS = 1024  # spans per LmdbStore.put call: what one spill batch of the placement hands over at this shape
COLD_SHARE = 8  # the cold pass reads a random 1/COLD_SHARE of the spans
READ_SPANS = 254  # spans per get_into call: a quarter of one layer's selection at 1M tokens (8 KV heads x 127 spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of spans written per measurement (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the LMDB files (default: the temp folder)")
    parser.add_argument("--repeats", type=positive, default=3,
                        help="measurements of each kind; the median is reported")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for spill.json and spill.png (default runs/spill-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="tiny spans, 4 MiB: a CPU smoke run (CI)")
    parser.add_argument("--read-path", choices=("pread", "lmdb"), default="pread",
                        help="how spans are read back: pread of each record at its noted place (the store's way), or "
                             "through LMDB read transactions (its place forgotten), to compare the two")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # stopped by `timeout` or a scheduler, the run unwinds: no spill file stays behind
    shape = QUICK_SPAN_SHAPE if args.quick else SPAN_SHAPE
    gib = 4 / 1024 if args.quick else args.gib
    span_bytes = int(np.prod(shape)) * 2
    put_spans = 64 if args.quick else PUT_SPANS
    count = max(put_spans, int(gib * 2**30) // span_bytes // put_spans * put_spans)
    spans = torch.randn(count, *shape).to(torch.bfloat16)  # [N, 2, Hkv, S, D], the host copies being spilled
    folder = Path(tempfile.mkdtemp(prefix="kvtier-spill-bench-", dir=args.dir))
    batch = 16 if args.quick else READ_SPANS
    stages = {
        "encode_each": lambda: _encode(spans, span_bytes),
        "lmdb_put": lambda: _lmdb_put(spans, span_bytes, folder),
        "writer": lambda: _writer(spans, shape, put_spans, folder),
        "reads": lambda: _read_twice(spans, shape, put_spans, folder, batch, args.read_path),
    }
    runs = {name: [] for name in stages}
    try:
        with tqdm(total=len(stages) * args.repeats, desc="spill", unit="run") as bar:
            for name, measure in stages.items():
                bar.set_postfix_str(name)
                for _ in range(args.repeats):
                    runs[name].append(measure())
                    bar.update()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    measured = {name: statistics.median(runs[name]) for name in ("encode_each", "lmdb_put", "writer")}
    reads, disk_per_byte = _reads(runs["reads"], spans.shape[0])
    measured.update(reads)
    gb = spans.numel() * 2 / 1e9
    rates = {name: gb / seconds for name, seconds in measured.items()}
    result = {"span_shape": list(shape), "gb": round(gb, 3), "seconds": measured, "gb_per_s": rates,
              "writer_vs_lmdb_put": rates["writer"] / rates["lmdb_put"], "read_cold_disk_bytes_per_byte": disk_per_byte,
              "read_path": args.read_path, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out = args.out or default_out("spill")
    paths = [write_json(out / "spill.json", result, indent=2),
             bar_chart(out / "spill.png", list(rates), list(rates.values()), "GB/s (median)",
                       f"LMDB spill tier: {gb:.2f} GB of spans {tuple(shape)} bf16, {args.read_path} reads")]
    table = [f"{gb:.2f} GB of spans {tuple(shape)} bf16, median of {args.repeats}:", "| stage | GB/s |", "|---|---|"]
    table += [f"| {name} | {rate:.2f} |" for name, rate in rates.items()]
    table.append(f"writer at {result['writer_vs_lmdb_put']:.0%} of LMDB's own put; reads ({args.read_path}): random "
                 f"batches of spans, cold a random 1/{COLD_SHARE} of them, warm all; cold, the disk read "
                 f"{disk_per_byte if disk_per_byte is not None else float('nan'):.2f} bytes per byte of spans asked")
    print_report(paths, "\n".join(table))
    return 0


def _batches_of(spans: torch.Tensor, span_bytes: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(uids, spans) per writer transaction."""
    per_batch = max(1, WRITE_BATCH_BYTES // span_bytes)
    return [(np.arange(start, min(start + per_batch, spans.shape[0])), spans[start : start + per_batch])
            for start in range(0, spans.shape[0], per_batch)]


def _encode(spans: torch.Tensor, span_bytes: int) -> float:
    """Seconds to checksum and assemble every record (no LMDB)."""
    start = time.perf_counter()
    for uids, part in _batches_of(spans, span_bytes):
        encode_each(uids, part)
    return time.perf_counter() - start


def _lmdb_put(spans: torch.Tensor, span_bytes: int, folder: Path) -> float:
    """Seconds for LMDB to take ready-made records, a batch per transaction, into a fresh spill file."""
    batches = [encode_each(uids, part) for uids, part in _batches_of(spans, span_bytes)]
    store = LmdbStore.spill(folder, spans.shape[1:], spans.dtype, None)
    lock = threading.Lock()
    try:
        start = time.perf_counter()
        for items in batches:
            put_records(store.env, items, lock)
        return time.perf_counter() - start
    finally:
        store.close()


def _writer(spans: torch.Tensor, shape: tuple[int, ...], put_spans: int, folder: Path) -> float:
    """Seconds from the first LmdbStore.put to the last commit, spans handed over `put_spans` at a time."""
    store = LmdbStore.spill(folder, shape, spans.dtype, None)
    try:
        start = time.perf_counter()
        for first in range(0, spans.shape[0], put_spans):
            store.put(np.arange(first, first + put_spans), spans[first : first + put_spans])
        while store.pending():
            store.wait_any()
        seconds = time.perf_counter() - start
        check = torch.empty(1, *shape, dtype=spans.dtype)
        store.get_into(np.array([spans.shape[0] - 1]), check)
        if not torch.equal(check[0], spans[-1]):
            raise AssertionError("the last span read back differs from the one written")
        return seconds
    finally:
        store.close()


def _reads(runs: list[tuple[float, float, float | None]], count: int) -> tuple[dict[str, float], float | None]:
    """_read_twice's repeated runs over `count` spans -> median seconds of the cold and of the warm pass, each scaled
    to every span (so GB/s divides like the other stages), and the median disk bytes read per byte of spans asked in
    the cold pass (None where /proc/self/io is missing)."""
    asked = {"read_cold": count // COLD_SHARE, "read_warm": count}  # spans read per pass
    seconds = {name: statistics.median(run[index] for run in runs) * count / asked[name]
               for index, name in enumerate(asked)}
    disk = [run[2] for run in runs]
    return seconds, None if None in disk else statistics.median(disk)


def _disk_read_bytes() -> int | None:
    """Bytes this process has caused to be read from block devices (Linux's /proc/self/io), None elsewhere."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return None
    return int(fields["read_bytes"])


def _read_twice(spans: torch.Tensor, shape: tuple[int, ...], put_spans: int, folder: Path,
                batch: int, path: str) -> tuple[float, float, float | None]:
    """Seconds to read spans back in random batches of `batch` (verified against what was written) from a fresh spill
    file: cold, a random 1/COLD_SHARE of them from the disk (the file's pages dropped from the page cache first), as a
    decode step asks a few spans of many; then warm, every span from the page cache. -> (cold seconds, warm seconds,
    the bytes the disk read per byte of spans asked in the cold pass (Linux): the price of read-ahead)."""
    store = LmdbStore.spill(folder, shape, spans.dtype, None)
    try:
        for first in range(0, spans.shape[0], put_spans):
            store.put(np.arange(first, first + put_spans), spans[first : first + put_spans])
        while store.pending():
            store.wait_any()
        if path == "lmdb":
            store.offset_of.data[:] = -1
        _drop_cached_pages(store.path)
        order = np.random.default_rng(0).permutation(spans.shape[0])
        out = torch.empty(batch, *shape, dtype=spans.dtype)
        cold = order[: spans.shape[0] // COLD_SHARE]
        disk_before = _disk_read_bytes()
        cold_s = _read_all(store, cold, out, spans)
        disk_after = _disk_read_bytes()
        _read_all(store, order, out, spans)  # every page into the cache
        warm_s = _read_all(store, order, out, spans)
        disk = None if disk_before is None else (disk_after - disk_before) / (len(cold) * store.span_bytes)
        return cold_s, warm_s, disk
    finally:
        store.close()


def _read_all(store: LmdbStore, order: np.ndarray, out: torch.Tensor, spans: torch.Tensor) -> float:
    """Seconds to read spans `order` in batches of len(out), each batch checked against `spans`."""
    start = time.perf_counter()
    for first in range(0, len(order), out.shape[0]):
        uids = order[first : first + out.shape[0]]
        store.get_into(uids, out[: len(uids)])
        if not torch.equal(out[: len(uids)], spans[torch.from_numpy(uids)]):
            raise AssertionError("spans read back differ from those written")
    return time.perf_counter() - start


def _drop_cached_pages(path: Path) -> None:
    """Evict a file's clean pages from the OS page cache (no root needed), so the next reads come from the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
        os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(handle)


if __name__ == "__main__":
    raise SystemExit(main())
