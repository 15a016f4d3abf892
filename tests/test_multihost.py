"""Multi-host for real on one machine: two processes of 4 CPU devices each (gloo collectives) train the
same SAE as one process of 8 devices, on a 4 × 2 (data × model) mesh; only process 0 writes."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import ROOT
from safetensors.numpy import load_file

WORKER = """
import os, sys
n_local, out = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_local}"
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from conftest import small_config
import jax
jax.config.update("jax_enable_compilation_cache", False)  # cached CPU executables with collectives deadlock
from sae.config import MeshConfig
from sae.training import train
cfg = small_config("topk", total_tokens=40960, k=3)
cfg.mesh = MeshConfig(data=4, model=2)
if len(sys.argv) > 3:
    cfg.mesh.distributed = True
    cfg.mesh.coordinator_address, cfg.mesh.num_processes, cfg.mesh.process_id = sys.argv[3], 2, int(sys.argv[4])
train(cfg, out)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(*args):
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ))


def test_two_processes_train_like_one(tmp_path):
    address = f"localhost:{free_port()}"
    # one at a time: 8 CPU device threads per collective must all get a core share within XLA's timeout
    for group in ([launch(8, tmp_path / "single")],
                  [launch(4, tmp_path / "multi", address, 0), launch(4, tmp_path / "multi", address, 1)]):
        for proc in group:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]
    single = load_file(tmp_path / "single" / "sae" / "sae_weights.safetensors")
    multi = load_file(tmp_path / "multi" / "sae" / "sae_weights.safetensors")
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    single_log = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    multi_log = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(multi_log) == len(single_log) > 0  # process 0 logged every interval
