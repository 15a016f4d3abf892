"""Caching activations from a JAX/Flax model: capture a sown intermediate, stream token batches into a store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from sae.data.sources import Chunk
from sae.data.store import StoreError, StoreWriter


def _sites(intermediates: nnx.State) -> dict[str, nnx.Variable]:
    """Sown intermediates by '/'-joined path, e.g. {'layers/0/mlp_post': Intermediate(...)}."""
    return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(intermediates)}


def capture_site(module: nnx.Module, site: str) -> Callable[[jax.Array], jax.Array]:
    """A jitted function tokens [batch, seq] int32 -> activations [batch, seq, d] at `site`.

    `module(tokens)` must record the value with `self.sow(nnx.Intermediate, name, value)`; `site` is that
    name (when only one submodule sows it) or its full path, e.g. "layers/3/mlp_post". The module is split
    once; each call is one pure `jax.jit` call that merges the state and runs `nnx.capture` inside (the
    module itself is left unchanged, other sown values are dropped by the compiler). A site the module never
    sows raises ValueError (naming the sites that exist) on the first call, when the forward is traced.
    """
    graphdef, state = nnx.split(module)

    def forward(state: nnx.State, tokens: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        _, intermediates = nnx.capture(model, nnx.Intermediate)(tokens)
        sites = _sites(intermediates)
        matches = [p for p in sites if p == site] or [p for p in sites if p.rsplit("/", 1)[-1] == site]
        if len(matches) != 1:
            why = "is sown at several paths" if matches else "is never sown by the module"
            raise ValueError(
                f"site {site!r} {why}; sown sites: {sorted(sites) or 'none'} "
                f"(record one with self.sow(nnx.Intermediate, name, value))"
            )
        values = sites[matches[0]].get_value()
        if len(values) != 1:
            raise ValueError(f"site {matches[0]!r} is sown {len(values)} times per forward pass; expected once")
        return values[0]

    jitted = jax.jit(forward)
    return lambda tokens: jitted(state, tokens)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_whole_sequences(shard_rows: int, per_seq: int, first_position_skipped: bool = False) -> None:
    """Shards must hold whole sequences, so that an interrupted run resumes on a sequence boundary."""
    if shard_rows % per_seq:
        raise StoreError(
            f"shard_rows={shard_rows} is not a multiple of the {per_seq} rows per sequence "
            f"(seq={per_seq + first_position_skipped}{', first position skipped' if first_position_skipped else ''}): "
            f"shards must hold whole sequences so that an interrupted run can resume; use e.g. shard_rows="
            f"{max(1, shard_rows // per_seq) * per_seq}"
        )


def model_chunks(
    activations_fn: Callable[[jax.Array], jax.Array],
    token_batches: Iterable[np.ndarray],
    start_row: int = 0,
    n_sequences: int | None = None,
    skip_first_position: bool = False,
    shard_rows: int | None = None,
) -> Iterator[Chunk]:
    """Run `activations_fn` over token batches: Chunk(rows [batch * seq', d], token ids, positions [batch * seq']).

    activations_fn: tokens [batch, seq] int32 -> activations [batch, seq, d] (e.g. `capture_site(...)`).
    token_batches: [batch, seq] integer arrays, all with the same seq; the batch size may vary.
    Rows are in sequence-major order, positions 0..seq-1, or 1..seq-1 with `skip_first_position` (which drops
    e.g. a BOS position); seq' = seq or seq - 1. At most `n_sequences` sequences are used. The first start_row
    rows (whole sequences: a resumed run's) are skipped; batches are still run whole, so the rows are identical
    to an uninterrupted run's. shard_rows, when given, must hold whole sequences (`check_whole_sequences`).
    The next batch is dispatched before the last one's activations are brought to the host.
    """
    start_pos = 1 if skip_first_position else 0
    seq = skip = None
    seen = 0  # sequences taken from token_batches (incl. skipped ones)
    pending = None

    def chunk(item) -> Chunk:
        out, tokens, lo, hi = item  # keep sequences [lo, hi) of this batch
        acts = np.asarray(out)
        if acts.ndim != 3 or acts.shape[:2] != tokens.shape:
            raise ValueError(
                f"activations_fn returned shape {acts.shape} for tokens {tokens.shape}; "
                f"expected {tokens.shape + ('d',)}"
            )
        acts = acts[lo:hi, start_pos:].reshape(-1, acts.shape[-1])
        ids = tokens[lo:hi, start_pos:].reshape(-1)
        positions = np.tile(np.arange(start_pos, seq, dtype=np.int32), hi - lo)
        return Chunk(acts, ids, positions)

    for batch in token_batches:
        tokens = np.asarray(batch)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token batches must be [batch, seq] integer arrays; got {tokens.dtype} {tokens.shape}")
        tokens = tokens.astype(np.int32, copy=False)
        if seq is None:
            seq = tokens.shape[1]
            per_seq = seq - start_pos
            if per_seq <= 0:
                raise ValueError(f"sequences of length {seq} leave no rows with skip_first_position")
            if shard_rows is not None:
                check_whole_sequences(shard_rows, per_seq, bool(start_pos))
            skip = start_row // per_seq
        elif tokens.shape[1] != seq:
            raise ValueError(f"all token batches must have seq={seq}; got a batch of shape {tokens.shape}")
        lo = max(0, skip - seen)
        hi = len(tokens) if n_sequences is None else min(len(tokens), n_sequences - seen)
        seen += len(tokens)
        if lo < hi:
            out = activations_fn(tokens)  # dispatched asynchronously: the device runs it while we write the last
            if isinstance(out, jax.Array):
                out.copy_to_host_async()
            if pending is not None:
                yield chunk(pending)
            pending = (out, tokens, lo, hi)
        if n_sequences is not None and seen >= n_sequences:
            break
    if pending is not None:
        yield chunk(pending)


def cache_model(
    activations_fn: Callable[[jax.Array], jax.Array],
    token_batches: Iterable[np.ndarray],
    writer: StoreWriter,
    n_sequences: int | None = None,
    skip_first_position: bool = False,
    log_every_s: float = 5.0,
    log: Callable[[str], object] = print,
) -> dict:
    """Append the activations of `model_chunks(activations_fn, token_batches, ...)` to `writer` as rows.

    Token ids and positions are stored when the writer was made `with_tokens`. If the writer resumes an
    interrupted run (`writer.rows_written > 0`), the sequences already stored are skipped; this needs shards of
    whole sequences: `shard_rows` must be a multiple of seq'. A progress line (rows done / total, rows/s, ETA)
    goes to `log` every `log_every_s` seconds.
    Returns {"rows", "resumed_rows", "total_rows", "sequences", "seconds", "rows_per_s"}; "rows" counts this run.
    """
    shard_rows, with_tokens = writer.settings["shard_rows"], writer.settings["with_tokens"]
    resumed_rows = writer.rows_written
    rows, per_seq, total = 0, 0, None  # rows appended this run; rows per sequence; rows in all
    t0 = last_log = time.perf_counter()
    for chunk in model_chunks(
        activations_fn, token_batches, resumed_rows, n_sequences, skip_first_position, shard_rows
    ):
        if not per_seq:  # positions run start_pos .. seq − 1 in every sequence
            per_seq = int(chunk.positions.max() - chunk.positions.min() + 1)
            total = None if n_sequences is None else n_sequences * per_seq
        if with_tokens:
            writer.append(chunk.rows, tokens=chunk.tokens, positions=chunk.positions)
        else:
            writer.append(chunk.rows)
        rows += len(chunk.rows)
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            last_log = now
            log(_progress(resumed_rows, rows, total, now - t0))
    seconds = time.perf_counter() - t0
    log(_progress(resumed_rows, rows, total, seconds, done=True))
    return {
        "rows": rows,
        "resumed_rows": resumed_rows,
        "total_rows": resumed_rows + rows,
        "sequences": (resumed_rows + rows) // per_seq if per_seq else 0,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds > 0 else 0.0,
    }


def _progress(resumed: int, rows: int, total: int | None, seconds: float, done: bool = False) -> str:
    """One progress line: a bar when the total is known, rows done / total, rows/s, ETA (or elapsed time)."""
    rate = rows / seconds if seconds > 0 else 0.0
    have = resumed + rows
    if total:
        frac = min(1.0, have / total)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        head = f"[{bar}] {have:,}/{total:,} rows ({100 * frac:.1f}%)"
    else:
        head = f"{have:,} rows"
    if resumed:
        head += f" ({resumed:,} resumed)"
    tail = f"in {_duration(seconds)}" if done or not total or not rate else f"ETA {_duration((total - have) / rate)}"
    return f"{head}, {rate:,.0f} rows/s, {tail}"
