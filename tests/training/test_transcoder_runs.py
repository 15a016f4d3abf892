"""Transcoders and a CLT trained end to end on pairs cached from a tiny random Llama (2 layers): metrics.json
(FVU against y, per layer for the CLT, replacement-model scores), the exports (SAELens loads the per-layer
ones and gives our outputs; the CLT layout as circuit-tracer reads it), and bad input on the command line as
one line, nothing trained."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT, small_config
from hf_oracle import TEXT, save_checkpoint, tiny_llama

from sae.cache import cache
from sae.config import CacheConfig, CorpusConfig, LoggerConfig
from sae.data.cached import CachedConfig
from sae.data.hf import HFRowsConfig
from sae.data.store import Store
from sae.export import load_sae
from sae.export_clt import load_clt
from sae.training import train

N_CTX, N_ROWS = 16, 900
SITES = [f"blocks.{layer}.{site}" for layer in range(2) for site in ("ln2.hook_normalized", "hook_mlp_out")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Every layer's MLP input and output of a tiny Llama, cached in one pass."""
    root = tmp_path_factory.mktemp("pairs")
    model = save_checkpoint(tiny_llama(attn_implementation="eager"), root / "llama")
    (root / "text").mkdir()
    for i in range(40):
        (root / "text" / f"doc{i}.txt").write_text(f"# document {i}\n" + "".join(TEXT[i % 4 :: 3]))
    source = HFRowsConfig(path=str(model), sites=SITES, n_rows=N_ROWS, n_ctx=N_CTX, batch_size=4)
    corpus = CorpusConfig(path=str(root / "text"), pattern="*.txt", val_fraction=0.25)
    cache(CacheConfig(source=source, out=str(root / "pairs"), corpus=corpus, dtype="float32", shard_rows=150))
    return root / "pairs"


def trained(name: str, data: CachedConfig, out: Path, **sae_fields) -> dict:
    cfg = small_config(name, total_tokens=4096, **sae_fields)
    cfg.sae.d_sae = 64
    cfg.data = data
    cfg.trainer = dataclasses.replace(cfg.trainer, batch_size=64, geometric_median_samples=64, log_every=16)
    cfg.logger = LoggerConfig(name="none")
    train(cfg, out)
    return json.loads((out / "metrics.json").read_text())


def test_transcoder_runs_report_fvu_against_y_and_export_for_saelens(pairs, tmp_path):
    from sae_lens import SAE as SAELensSAE

    layer0 = CachedConfig(path=str(pairs / SITES[0]), target=str(pairs / SITES[1]), eval_tokens=64)
    for name, fields, arch in [
        ("relu", {}, "transcoder"),
        ("jumprelu", {"skip": True}, "jumprelu_skip_transcoder"),
        ("topk", {"k": 4, "skip": True}, "topk_skip_transcoder"),
    ]:
        metrics = trained(name, layer0, tmp_path / name, **fields)
        for key in ("fvu", "l0", "ce_loss_score", "kl_div", "top1_agreement"):
            assert np.isfinite(metrics[key]), (name, key)
        assert 0 < metrics["top1_agreement"] <= 1 and metrics["kl_div"] >= 0
        loaded = load_sae(tmp_path / name / "sae")
        assert loaded.cfg["architecture"] == arch and loaded.cfg["metadata"]["hook_name_out"] == SITES[1]
        # FVU against y, recomputed in NumPy from the export on the held-out tail
        x_store, y_store = Store(pairs / SITES[0]), Store(pairs / SITES[1])
        x, y = x_store.read_rows(N_ROWS - 64, N_ROWS), y_store.read_rows(N_ROWS - 64, N_ROWS)
        y_hat = np.asarray(loaded(jnp.asarray(x)))
        fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        np.testing.assert_allclose(metrics["fvu"], fvu, rtol=1e-3)
        if not arch.startswith("topk"):  # SAELens has no TopK transcoder class
            theirs = SAELensSAE.load_from_disk(str(tmp_path / name / "sae"), device="cpu")
            with torch.no_grad():
                got = theirs(torch.as_tensor(x)).numpy()
            np.testing.assert_allclose(got, y_hat, rtol=1e-4, atol=1e-5)
            assert theirs.cfg.metadata.hook_name_out == SITES[1] and theirs.cfg.d_out == y.shape[1]


def test_clt_run_reports_per_layer_fvu_and_the_replacement_model(pairs, tmp_path):
    data = CachedConfig(path=str(pairs), layers="all", eval_tokens=64)
    metrics = trained("clt", data, tmp_path / "clt", l0_coefficient=0.01)
    assert len(metrics["fvu_per_layer"]) == 2 and len(metrics["l0_per_layer"]) == 2
    for key in ("ce_loss_score", "kl_div", "top1_agreement"):
        assert np.isfinite(metrics[key]), key
    loaded = load_clt(tmp_path / "clt" / "sae")
    assert loaded.input_sites == [SITES[0], SITES[2]] and loaded.output_sites == [SITES[1], SITES[3]]
    x = np.stack([Store(pairs / SITES[i]).read_rows(N_ROWS - 64, N_ROWS) for i in (0, 2)], axis=1)
    y = np.stack([Store(pairs / SITES[i]).read_rows(N_ROWS - 64, N_ROWS) for i in (1, 3)], axis=1)
    y_hat = np.asarray(loaded.clt.decode(loaded.params, loaded.clt.encode(loaded.params, jnp.asarray(x), {})))
    for layer in range(2):
        fvu = ((y[:, layer] - y_hat[:, layer]) ** 2).sum() / ((y[:, layer] - y[:, layer].mean(0)) ** 2).sum()
        np.testing.assert_allclose(metrics["fvu_per_layer"][layer], fvu, rtol=1e-3)


@pytest.mark.slow
def test_bad_pairs_on_the_command_line_are_one_line(pairs, tmp_path):
    script = str(Path(ROOT) / "scripts" / "train_sae.py")
    x0, y0 = pairs / SITES[0], pairs / SITES[1]
    cases = {
        "target_first": ([f"data.path={y0}", f"data.target={x0}"], "comes before"),
        "gated": (["sae=gated", f"data.path={x0}", f"data.target={y0}"], "sae=gated cannot be a transcoder"),
        "skip_sae": (["sae.skip=true", f"data.path={x0}"], "sae.skip=true needs pairs"),
        "d_out": (["sae.d_out=7", f"data.path={x0}", f"data.target={y0}"], "sae.d_out=7 does not match"),
        "clt_order": (
            ["sae=clt", f"data.path={pairs}", "data.layers=all", "data.input_site=hook_mlp_out"],
            "data.output_site",
        ),
        "skip_clt": (["sae=clt", "sae.skip=true", f"data.path={pairs}", "data.layers=all"], "no skip path"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, script, "data=cached", "trainer.batch_size=64", *args, f"hydra.run.dir={tmp_path / name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and cases[name][1] in err, (name, err[-1500:])
        assert "Traceback" not in err and not (tmp_path / name / "metrics.jsonl").exists(), name
