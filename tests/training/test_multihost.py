"""Multi-host for real on one machine: two processes of 4 CPU devices each (gloo collectives) train the
same SAE as one process of 8 devices, on a 4 × 2 (data × model) mesh; only process 0 writes. Both are
stopped by SIGTERM at step 20 and resumed from their sharded checkpoint on the way."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file

WORKER = """
import os, sys
n_local, out, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "stop"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_local}"
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from conftest import small_config
import jax
jax.config.update("jax_enable_compilation_cache", False)  # cached CPU executables with collectives deadlock
import signal, time
from sae.checkpoint import Preempted
from sae.config import MeshConfig
from sae.data.synthetic import SyntheticBatches
from sae.training import train
cfg = small_config("topk", total_tokens=40960, k=3)
cfg.mesh = MeshConfig(data=4, model=2)
if len(sys.argv) > 4:
    cfg.mesh.distributed = True
    cfg.mesh.coordinator_address, cfg.mesh.num_processes, cfg.mesh.process_id = sys.argv[4], 2, int(sys.argv[5])
if stop:  # a pre-emption notice (SIGTERM) to this process while step 20's batch is drawn
    batches = SyntheticBatches.train_batches
    def stopping(self, batch_size, n_batches, seed, start_batch=0):
        for i, x in enumerate(batches(self, batch_size, n_batches, seed, start_batch), start=start_batch + 1):
            if i == 20:
                os.kill(os.getpid(), signal.SIGTERM)
            if i > 20:  # steps as slow as a real run's, so the preemption service agrees before step 40
                time.sleep(0.25)
            yield x
    SyntheticBatches.train_batches = stopping
try:
    train(cfg, out)
except Preempted as err:
    print(err)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(*args):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    first, second = (f"localhost:{free_port()}" for _ in range(2))  # a coordinator per launch
    # one at a time: 8 CPU device threads per collective must all get a core share within XLA's timeout
    outputs = []
    groups = [
        ((8, "single", "run"),),
        ((8, "resumed", "stop"),),
        ((8, "resumed", "run"),),
        ((4, "multi", "stop", first, 0), (4, "multi", "stop", first, 1)),
        ((4, "multi", "run", second, 0), (4, "multi", "run", second, 1)),
    ]
    for group in groups:  # each group ends before the next starts
        procs = [launch(n, tmp_path / out_dir, *rest) for n, out_dir, *rest in group]
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{len(outputs)}: {out[-3000:]}"
            outputs.append(out)
    stopped = [out for out in outputs if "stopped by SIGTERM" in out]
    # one process stops at step 20; two stop where JAX's preemption service has them agree, at 20 or later
    assert len(stopped) == 3, outputs
    assert all(20 <= int(out.split("stopped by SIGTERM at step ")[1].split(";")[0]) < 40 for out in stopped), stopped
    assert sum("resuming from" in out for out in outputs) == 2, outputs  # process 1 does not print
    # Resumed on the same mesh: exactly the uninterrupted run.
    single = load_file(tmp_path / "single" / "sae" / "sae_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "sae" / "sae_weights.safetensors")
    for name in single:
        np.testing.assert_array_equal(resumed[name], single[name], err_msg=name)
    multi = load_file(tmp_path / "multi" / "sae" / "sae_weights.safetensors")
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    single_log = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    multi_log = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(multi_log) == len(single_log) > 0  # process 0 logged every interval
