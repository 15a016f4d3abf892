"""CPU kernels (XLA FFI custom calls) for the sparse parts of TopK-family steps.

XLA's CPU backend runs top-k, gathers and scatters on one thread (and its top-k sorts whole rows);
`cpu_kernels.cc` splits them over XLA's intra-op thread pool. It is compiled with the system C++
compiler on first use (about 5 s) and cached under $SAE_JAX_CACHE (default ~/.cache/sae-jax), keyed by
the source, jaxlib's version, the compiler and the CPU. Where no compiler is found or the build fails,
a warning says why and the pure-XLA code runs instead; SAE_JAX_CPU_KERNELS=0 turns the kernels off.
SAE_JAX_CXXFLAGS adds compiler flags (e.g. -mno-avx512f builds the portable code paths on an AVX-512
machine; the tests do so).

Each op lowers to its kernel only for the CPU (`lax.platform_dependent`); on GPU/TPU the XLA
fallback the caller passes is used. Shapes: B tokens, N latents, D = d_in, k active latents per token.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_TARGETS = {
    "sae_top_k": "SaeTopK",
    "sae_gather_sum": "SaeGatherSum",
    "sae_gather_sum_grad": "SaeGatherSumGrad",
    "sae_scatter_columns": "SaeScatterColumns",
}
# Reassociation lets the compiler vectorise the dot products; infinities and NaNs keep their meaning.
_FLAGS = [
    "-O3",
    "-march=native",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fopenmp-simd",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
]
_state: dict = {}  # "lib": the loaded library once registered; "error": why the kernels are unavailable
_ENABLED = [os.environ.get("SAE_JAX_CPU_KERNELS", "1") != "0"]


def _cpu_model() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _build() -> Path:
    """Compile cpu_kernels.cc once per (source, jaxlib, compiler, CPU); returns the shared library."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    flags = [*_FLAGS, *shlex.split(os.environ.get("SAE_JAX_CXXFLAGS", ""))]
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), jaxlib.__version__, cxx, *flags, platform.machine(), _cpu_model()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("SAE_JAX_CACHE", "~/.cache/sae-jax")).expanduser() / "kernels"
    library = cache / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: safe for parallel builds
        built = Path(tmp) / library.name
        result = subprocess.run(
            [cxx, *flags, "-isystem", include, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {_SOURCE}:\n{result.stderr[-2000:]}")
        os.replace(built, library)
    return library


def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA (built on the first call)."""
    if "lib" not in _state and "error" not in _state:
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            for name, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state["lib"] = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _state["error"] = str(error)
            warnings.warn(f"sae.kernels: CPU kernels unavailable, using XLA's ops (slower): {error}", stacklevel=2)
    return "lib" in _state


def usable(*arrays: jax.Array) -> bool:
    """Trace-time switch: kernels on and available, and every float operand float32."""
    floats_ok = all(a.dtype == jnp.float32 for a in arrays if jnp.issubdtype(a.dtype, jnp.floating))
    return _ENABLED[-1] and floats_ok and available()


@contextlib.contextmanager
def use(enabled: bool):
    """Trace with (True) or without (False: XLA's ops) the kernels; applies to functions traced inside."""
    _ENABLED.append(enabled)
    try:
        yield
    finally:
        _ENABLED.pop()


def _on_cpu(kernel: Callable, fallback: Callable, *args):
    return jax.lax.platform_dependent(*args, cpu=kernel, default=fallback)


def top_k(z: jax.Array, bias: jax.Array, k: int, relu: bool, fallback: Callable) -> tuple[jax.Array, jax.Array]:
    """Row-wise top-k of (ReLU)(z + bias): z [B, N], bias [N] -> (values [B, k] descending, indices [B, k])."""
    batch = z.shape[0]
    call = jax.ffi.ffi_call(
        "sae_top_k",
        (jax.ShapeDtypeStruct((batch, k), jnp.float32), jax.ShapeDtypeStruct((batch, k), jnp.int32)),
        vmap_method="sequential",
    )
    return _on_cpu(lambda z, b: tuple(call(z, b, relu=relu)), fallback, z, bias)


def gather_sum(vals: jax.Array, w_rows: jax.Array, idx: jax.Array, fallback: Callable) -> jax.Array:
    """[B, D]: out[b] = Σ_j vals[b, j] w_rows[idx[b, j]]; vals, idx [B, k], w_rows [N, D]."""
    out = jax.ShapeDtypeStruct((vals.shape[0], w_rows.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call("sae_gather_sum", out, vmap_method="sequential")
    return _on_cpu(lambda v, w, i: call(v, w, i), fallback, vals, w_rows, idx.astype(jnp.int32))


def gather_sum_grad(
    vals: jax.Array, w_rows: jax.Array, idx: jax.Array, g: jax.Array, fallback: Callable
) -> tuple[jax.Array, jax.Array]:
    """gather_sum's backward for upstream g [B, D]: (∂/∂vals [B, k] = g[b] · w_rows[idx[b, j]],
    ∂/∂w_rows [N, D] = Σ_{b,j: idx[b,j] = i} vals[b, j] g[b]), in one pass."""
    outs = (jax.ShapeDtypeStruct(idx.shape, jnp.float32), jax.ShapeDtypeStruct(w_rows.shape, jnp.float32))
    call = jax.ffi.ffi_call("sae_gather_sum_grad", outs, vmap_method="sequential")
    return _on_cpu(lambda v, w, i, g: tuple(call(v, w, i, g)), fallback, vals, w_rows, idx.astype(jnp.int32), g)


def scatter_columns(vals: jax.Array, rows: jax.Array, idx: jax.Array, n: int, fallback: Callable) -> jax.Array:
    """[D, N]: out[:, i] = Σ_{b,j: idx[b,j] = i} vals[b, j] rows[b]; vals, idx [B, k], rows [B, D]."""
    call = jax.ffi.ffi_call(
        "sae_scatter_columns", jax.ShapeDtypeStruct((rows.shape[1], n), jnp.float32), vmap_method="sequential"
    )
    return _on_cpu(lambda v, r, i: call(v, r, i), fallback, vals, rows, idx.astype(jnp.int32))
