"""Throughput of the on-disk activation store: writing and shuffled reading.

  python scripts/benchmark_store.py [--rows 2200000] [--d-in 512] [--dtype float16] [--shard-rows 262144]
      [--batch 4096] [--mixing-rows 1048576] [--batches 300] [--sae-steps 5] [--dir DIR [--keep]] [--no-verify]

Writes a store of `--rows` synthetic rows (a fixed random block, tiled with per-chunk flips of its lowest
mantissa bits so chunks differ) through `StoreWriter`, reads it back twice through `StoreLoader` (shuffled
windows, checksums verified unless --no-verify) and optionally times the TopK train step on this
machine. Prints ONE JSON object (MB = 1e6 bytes; seconds are wall clock):

- machine: cpu_count (os.cpu_count()), mem_total_bytes (/proc/meminfo), load_avg_before (1/5/15-minute
  load average before the run; machines are shared and noisy), uptime (the `uptime` line).
- config: the arguments used.
- store_bytes: bytes of all files in the store directory.
- write: rows, seconds (StoreWriter.append + close: dtype cast, NaN scan, shard files, BLAKE2b checksums,
  fsync, rename, manifest; data generation excluded), generate_seconds (making the synthetic rows,
  reported separately), rows_per_s, mb_per_s (array bytes / seconds).
- page_cache_drop: attempted (os.posix_fadvise(POSIX_FADV_DONTNEED) on every shard file before the cold
  pass), resident_before / resident_after (fraction of the shard pages in the page cache, from mincore(2);
  null if mincore is unavailable), worked (resident_after < 0.05; null when unknown).
- read.cold / read.warm: one StoreLoader pass each (same seed: the warm pass rereads the pages the cold
  pass brought in), consuming `--batches` batches with a consumer that does nothing. batches, rows,
  seconds (from constructing the loader, whose thread starts at once, to the last batch), first_batch_s,
  read_rows_per_s (rows / seconds, consumer side), read_mb_per_s, loader_thread_rows_per_s
  (`loader.rows_per_s`: rows per second of the thread's own busy time), cpu_cores_used (process CPU time
  / wall time during the pass, all threads; about 1 means the loader thread is CPU-bound).
- topk_step (with --sae-steps > 0): the dict from scripts/benchmark.py's `benchmark("topk", d_in, 8192,
  batch, 32, sae_steps)` on this machine's default JAX device; topk_step_rows_per_s (its tokens_per_s);
  loader_over_step (cold read_rows_per_s / topk_step_rows_per_s: > 1 means the loader keeps up with the
  step even from disk) and loader_over_step_warm (the same with the warm pass).
- total_seconds: the whole run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sae.data.loader import StoreLoader
from sae.data.store import DTYPES, Store, StoreWriter

MB = 1e6
GEN_CHUNK = 65_536  # rows per StoreWriter.append call
PAGE = mmap.PAGESIZE


# --- machine facts and the page cache ---


def machine_facts() -> dict:
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        uptime = subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = None
    return {
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "uptime": uptime,
    }


def dir_files(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


def drop_cache(files: list[Path]) -> bool:
    """Ask the kernel to evict the files' clean pages from the page cache; False if fadvise is unavailable."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


_LIBC = None


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages that are in the page cache (mincore(2)); None if that cannot be asked."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        resident = total = 0
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            pages = (size + PAGE - 1) // PAGE
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = np.frombuffer(mm, np.uint8)  # only for the mapping's address; no page is touched
                vec = np.zeros(pages, np.uint8)
                rc = _LIBC.mincore(view.ctypes.data, size, vec.ctypes.data)
                del view
                if rc != 0:
                    return None
            resident += int((vec & 1).sum())
            total += pages
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, BufferError):
        return None


def cache_drop_report(files: list[Path]) -> dict:
    before = resident_fraction(files)
    attempted = drop_cache(files)
    after = resident_fraction(files)
    worked = None if after is None else bool(attempted and after < 0.05)
    return {"attempted": attempted, "resident_before": before, "resident_after": after, "worked": worked}


# --- 1. writing ---


def write_store(path: Path, rows: int, d_in: int, dtype: str, shard_rows: int) -> dict:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((min(GEN_CHUNK, rows), d_in), np.float32).astype(DTYPES[dtype])
    bits = base.view(np.uint32 if DTYPES[dtype].itemsize == 4 else np.uint16)
    gen_s = write_s = 0.0
    with StoreWriter(path, d_in, dtype, shard_rows, provenance={"source": "benchmark_store synthetic"}) as writer:
        for i, start in enumerate(range(0, rows, GEN_CHUNK)):
            t0 = time.perf_counter()
            n = min(GEN_CHUNK, rows - start)
            chunk = (bits[:n] ^ bits.dtype.type(i % 16)).view(base.dtype)  # flip low mantissa bits: chunks differ
            t1 = time.perf_counter()
            writer.append(chunk)
            write_s += time.perf_counter() - t1
            gen_s += t1 - t0
        t0 = time.perf_counter()
    write_s += time.perf_counter() - t0  # close(): the last shard and the manifest
    nbytes = rows * d_in * DTYPES[dtype].itemsize
    return {
        "rows": rows,
        "seconds": write_s,
        "generate_seconds": gen_s,
        "rows_per_s": rows / write_s,
        "mb_per_s": nbytes / MB / write_s,
    }


# --- 2. shuffled reading ---


def read_pass(path: Path, batch: int, mixing_rows: int, batches: int, verify: bool) -> dict:
    store = Store(path)
    row_bytes = store.d_in * store.dtype.itemsize
    gc.collect()
    t0, cpu0 = time.perf_counter(), time.process_time()
    loader = StoreLoader(store, batch, seed=0, mixing_rows=mixing_rows, verify=verify)
    first = None
    count = 0
    try:
        for _ in loader:
            count += 1
            if first is None:
                first = time.perf_counter() - t0
            if count == batches:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        thread_rows_per_s = loader.rows_per_s
    finally:
        loader.close()
        loader._thread.join()  # a window load in flight is not interruptible: let it end before timing more
    rows = count * batch
    return {
        "batches": count,
        "rows": rows,
        "seconds": wall,
        "first_batch_s": first,
        "read_rows_per_s": rows / wall,
        "read_mb_per_s": rows * row_bytes / MB / wall,
        "loader_thread_rows_per_s": thread_rows_per_s,
        "cpu_cores_used": cpu / wall,
    }


# --- the run ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_200_000)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--shard-rows", type=int, default=262_144)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--mixing-rows", type=int, default=1_048_576)
    parser.add_argument("--batches", type=int, default=300, help="batches consumed per read pass")
    parser.add_argument("--sae-steps", type=int, default=5, help="TopK train steps to time; 0 skips")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--no-verify", action="store_true", help="the loader skips shard checksums")
    args = parser.parse_args()
    if args.rows < args.batch:
        parser.error(f"--rows {args.rows} is below --batch {args.batch}")

    began = time.perf_counter()
    result = {"machine": machine_facts(), "config": vars(args)}
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="benchmark_store_"))
    store_path = root / "store"
    try:
        result["write"] = write_store(store_path, args.rows, args.d_in, args.dtype, args.shard_rows)
        files = dir_files(store_path)
        result["store_bytes"] = sum(p.stat().st_size for p in files)
        shards = [p for p in files if p.suffix == ".npy"]
        result["page_cache_drop"] = cache_drop_report(shards)
        result["read"] = {"cold": read_pass(store_path, args.batch, args.mixing_rows, args.batches, not args.no_verify)}
        result["read"]["warm"] = read_pass(store_path, args.batch, args.mixing_rows, args.batches, not args.no_verify)
        if args.sae_steps > 0:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchmark import benchmark

            step = benchmark("topk", args.d_in, 8192, args.batch, 32, args.sae_steps)
            result["topk_step"] = step
            result["topk_step_rows_per_s"] = step["tokens_per_s"]
            result["loader_over_step"] = result["read"]["cold"]["read_rows_per_s"] / step["tokens_per_s"]
            result["loader_over_step_warm"] = result["read"]["warm"]["read_rows_per_s"] / step["tokens_per_s"]
    finally:
        if not args.keep:
            shutil.rmtree(store_path if args.dir else root, ignore_errors=True)
    result["total_seconds"] = time.perf_counter() - began
    print(json.dumps(result))


if __name__ == "__main__":
    main()
