"""Devices as a `data × model` mesh: batches sharded on `data`, latents (and their optimizer moments,
dead-latent counters, thresholds) sharded on `model`.

The train step is one `jax.jit` with these shardings; XLA's SPMD partitioner inserts the collectives
(all-reduces of gradients over `data`, gathers of latent-sharded activations where an op needs whole
rows, e.g. TopK's selection). The same code runs on 1 CPU, on 8 fake CPU devices in the tests, on a
GPU node and across the hosts of a TPU slice. `jax.pmap` is not used: it is legacy in current JAX,
and `jit` with shardings replaces it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sae.config import MeshConfig
from sae.errors import ConfigError

DATA, MODEL = "data", "model"


def initialize_distributed(cfg: MeshConfig) -> None:
    """Join the multi-host runtime when `mesh.distributed` (before anything touches a device).

    Unset fields come from the environment as `jax.distributed.initialize` reads it (TPU pods, SLURM,
    or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). CPU devices use gloo collectives.
    """
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
    )


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over the first data·model devices (`mesh.data` null: all devices)."""
    devices = jax.devices() if devices is None else devices
    model = cfg.model
    data = cfg.data if cfg.data is not None else len(devices) // max(model, 1)
    if model <= 0 or data <= 0 or data * model > len(devices) or (cfg.data is None and len(devices) % model):
        raise ConfigError(
            f"mesh.data={cfg.data} × mesh.model={cfg.model} does not fit the {len(devices)} devices available"
        )
    return Mesh(
        np.asarray(devices[: data * model]).reshape(data, model),
        (DATA, MODEL),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def latent_spec(shape: tuple[int, ...], d_sae: int, mesh: Mesh) -> PartitionSpec:
    """Shard the first axis of length d_sae on `model` (when it divides); replicate everything else."""
    n_model = mesh.shape[MODEL]
    for axis, size in enumerate(shape):
        if size == d_sae and n_model > 1 and size % n_model == 0:
            return PartitionSpec(*([None] * axis + [MODEL]))
    return PartitionSpec()


def state_shardings(state, d_sae: int, mesh: Mesh):
    """A pytree of NamedShardings matching `state` (params, optimizer moments, buffers, counters)."""
    return jax.tree.map(lambda leaf: NamedSharding(mesh, latent_spec(np.shape(leaf), d_sae, mesh)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """x: [batch, d_in] split over `data` (batch rows must divide by mesh.data)."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch as one array sharded over every process's devices."""
    return jax.make_array_from_process_local_data(sharding, local_rows)


def to_host(tree):
    """A pytree of (possibly sharded, multi-process) arrays as NumPy arrays holding the global values."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
