"""`sae.models.shard` on 8 fake CPU devices: weights split over the mesh's model axis, and the sharded model's
logits and captured site equal the unsharded model's (≤ 1e-5), on a model-only mesh (1×8) and on data 2 × model 4;
`source=hf` with source.model_shards=4 gives the single-device rows.

JAX is already imported in the pytest process (tests/conftest.py), so the device count is set in a subprocess,
as tests/test_parallel.py does; the checkpoint is written here, with transformers."""

import json
import subprocess
import sys

import torch
import transformers
from conftest import ROOT
from hf_oracle import TEXT, save_checkpoint

DRIVER = r"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import numpy as np
from flax import nnx

# no persistent compilation cache: jax 0.10.2 CPU executables with collectives, loaded from it, deadlock
from sae.config import MeshConfig
from sae.models import jitted, load_model, shard
from sae.parallel import make_mesh

SITE = "blocks.0.hook_resid_post"
model = load_model(sys.argv[1])
tokens = np.random.default_rng(0).integers(0, 320, (4, 16))
ref_logits, ref_sites = jitted(model, capture=[SITE])(tokens)
out = {"n_devices": len(jax.devices())}
for data, n_model in [(1, 8), (2, 4)]:
    sharded = shard(model, make_mesh(MeshConfig(data, n_model)))
    specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(nnx.state(sharded))]
    logits, sites = jitted(sharded, capture=[SITE])(tokens)
    out[f"{data}x{n_model}"] = {
        "split": sum("model" in spec for spec in specs),
        "leaves": len(specs),
        "wte_shard": list(nnx.state(sharded)["wte"][...].addressable_shards[0].data.shape),
        "logits": float(np.abs(np.asarray(logits) - np.asarray(ref_logits)).max()),
        "site": float(np.abs(np.asarray(sites[SITE]) - np.asarray(ref_sites[SITE])).max()),
    }
# sae-cache's source with its weights over 4 devices gives the single-device rows
from sae.config import CorpusConfig
from sae.data.hf import HFRows, HFRowsConfig

rows = {}
for n in (1, 4):
    cfg = HFRowsConfig(path=sys.argv[1], sites=[SITE], n_rows=64, n_ctx=16, model_shards=n)
    rows[n] = np.concatenate([c.rows[SITE] for c in HFRows(cfg, corpus=CorpusConfig(path=sys.argv[2])).chunks(0)])
out["cache_rows"] = float(np.abs(rows[4] - rows[1]).max())
out["cache_n"] = len(rows[4])
print(json.dumps(out))
"""


def test_sharded_gpt2_matches_unsharded(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    save_checkpoint(transformers.GPT2LMHeadModel(config).eval(), tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), str(text)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    for mesh, n_model in (("1x8", 8), ("2x4", 4)):
        got = out[mesh]
        # every matrix (wte, wpe, 4 kernels per block) has a dimension that divides 8 or 4: all are split
        assert got["split"] == 2 + 4 * 2, (mesh, got)
        assert got["wte_shard"] == [320 // n_model, 64], (mesh, got)  # an embedding: split by vocabulary
        assert got["logits"] <= 1e-5, (mesh, got)
        assert got["site"] <= 1e-5, (mesh, got)
    assert out["cache_n"] == 5 * 15 and out["cache_rows"] <= 1e-5, out  # 5 sequences of BOS + 15 tokens
