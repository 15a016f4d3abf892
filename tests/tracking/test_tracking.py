"""Tracking (sae/tracking/): offline W&B runs read back from their files, JSONL, none, config checks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, WANDB_ENV
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sae.cli import register_schemas
from sae.errors import ConfigError
from sae.tracking import (
    SAELENS_NAMES,
    LoggerConfig,
    histogram,
    log_toy_run,
    make_tracker,
    read_wandb_run,
    resolve_mode,
    to_wandb_metrics,
)


def wandb_files(root: Path) -> list[Path]:
    return sorted(root.rglob("run-*.wandb"))


def sae_export(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    (export / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_sae": 4}))
    (export / "sae_weights.safetensors").write_bytes(b"weights")
    return export


STEP_METRICS = {
    "loss": 0.5,
    "mse_loss": 0.4,
    "auxk_loss": 0.1,
    "l0": 8.0,
    "fvu": 0.2,
    "dead_fraction": 0.25,
    "lr": 1e-3,
    "tokens_per_s": 5000.0,
    "tokens": 4096,
}


def test_offline_wandb_run_holds_metrics_histograms_and_dictionary_artifact(offline, capsys):
    run_dir = offline / "run"
    config = {"sae": {"name": "topk", "d_sae": 4, "k": 2}, "seed": 0}
    tracker = make_tracker(LoggerConfig(name="wandb", project="test"), run_dir, config)
    assert tracker.mode == "offline" and tracker.run_id
    assert "wandb sync" in capsys.readouterr().out
    tracker.log(10, STEP_METRICS)
    tracker.log(20, {**STEP_METRICS, "loss": 0.3})
    density = np.log10(np.array([1e-1, 1e-2, 1e-7, 0.0]) + 1e-10)  # [d_sae], one dead latent
    tracker.log_histograms(20, {"feature_density_log10": density, "decoder_norm": np.array([1.0, 1.0, 0.5, 2.0])})
    table = {
        "density": np.array([0.1, 0.01, 1e-7, 0.0]),
        "max_activation": np.array([3.0, 2.0, 1.0, 0.0]),
        "best_true_feature": np.array([5, 1, 0, 2]),
        "best_cosine": np.array([0.99, 0.95, 0.4, 0.1]),
    }
    tracker.log_artifact(
        "sae-topk", "sae", sae_export(offline), table=table, metadata={"step": np.int64(20)}, aliases=["latest", "best"]
    )
    tracker.finish()
    tracker.finish()  # idempotent

    (path,) = wandb_files(offline / "wandb_dir")
    run = read_wandb_run(path)
    assert run["run_id"] == tracker.run_id
    assert run["config"]["sae"] == config["sae"]
    rows = {row["_step"]: row for row in run["history"]}
    assert set(rows) == {10, 20}
    first = rows[10]
    assert first["losses/overall_loss"] == 0.5 and first["losses/mse_loss"] == 0.4
    assert first["losses/auxiliary_reconstruction_loss"] == 0.1
    assert first["metrics/l0"] == 8.0 and first["metrics/fvu"] == 0.2
    assert first["metrics/explained_variance"] == pytest.approx(0.8)
    assert first["sparsity/dead_features"] == 1 and first["sparsity/dead_fraction"] == 0.25
    assert first["details/current_learning_rate"] == 1e-3 and first["details/n_training_tokens"] == 4096
    assert first["metrics/tokens_per_s"] == 5000.0
    assert rows[20]["losses/overall_loss"] == 0.3

    density_hist = rows[20]["plots/feature_density_line_chart"]
    counts, edges = np.histogram(density, bins=64)
    assert density_hist["_type"] == "histogram"
    assert density_hist["values"] == counts.tolist() and np.allclose(density_hist["bins"], edges)
    assert sum(rows[20]["weights/W_dec_norms"]["values"]) == 4
    assert rows[20]["sparsity/below_1e-5"] == 2 and rows[20]["sparsity/below_1e-6"] == 2
    assert rows[20]["metrics/mean_log10_feature_sparsity"] == pytest.approx(density.mean())

    (artifact,) = run["artifacts"]
    assert artifact["name"] == "sae-topk" and artifact["type"] == "sae"
    assert artifact["aliases"] == ["best", "latest"] and artifact["metadata"] == {"step": 20}
    assert set(artifact["files"]) == {"cfg.json", "sae_weights.safetensors", "feature_stats.table.json"}
    assert json.loads(Path(artifact["files"]["cfg.json"]).read_text())["d_sae"] == 4
    staged = json.loads(Path(artifact["files"]["feature_stats.table.json"]).read_text())
    assert staged["columns"] == list(table)
    assert staged["data"] == [list(row) for row in zip(*(v.tolist() for v in table.values()))]

    # the JSONL side is written too, and nothing W&B-related lands in the run dir when WANDB_DIR is set
    assert [json.loads(line)["step"] for line in (run_dir / "histograms.jsonl").read_text().splitlines()] == [20]
    assert not (run_dir / "wandb").exists()


def test_resumed_run_continues_the_same_wandb_run(offline):
    first = make_tracker(LoggerConfig(name="wandb"), offline / "run", {})
    first.log(1, {"loss": 2.0})
    first.finish()
    resumed = make_tracker(LoggerConfig(name="wandb"), offline / "run", {}, run_id=first.run_id)
    resumed.log(2, {"loss": 1.0})
    resumed.finish()
    assert resumed.run_id == first.run_id
    runs = [read_wandb_run(p) for p in wandb_files(offline / "wandb_dir")]
    assert [r["run_id"] for r in runs] == [first.run_id] * 2
    assert sorted(row["_step"] for r in runs for row in r["history"]) == [1, 2]


def test_wandb_files_go_under_the_run_dir_without_wandb_dir(offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.delenv("WANDB_MODE")  # logger.mode decides; without a key, null means offline
    tracker = make_tracker(LoggerConfig(name="wandb", mode="disabled"), offline / "off", {})
    tracker.log(1, {"loss": 1.0})
    tracker.finish()
    assert tracker.run_id is None and not (offline / "off" / "wandb").exists()  # disabled: a no-op run
    tracker = make_tracker(LoggerConfig(name="wandb"), offline / "run", {}, name="named")
    tracker.finish()
    (path,) = wandb_files(offline)
    assert path.is_relative_to(offline / "run" / "wandb") and read_wandb_run(path)["run_id"] == tracker.run_id


def test_unreachable_online_server_means_offline_with_the_same_id(offline, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 86)
    monkeypatch.delenv("WANDB_MODE")
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tracker = make_tracker(LoggerConfig(name="wandb"), offline / "run", {}, run_id="abc12345")
    tracker.log(1, {"loss": 1.0})
    tracker.finish()
    assert tracker.mode == "offline" and tracker.run_id == "abc12345"
    (path,) = wandb_files(offline)
    run = read_wandb_run(path)
    assert run["run_id"] == "abc12345" and run["history"][0]["losses/overall_loss"] == 1.0


def test_failed_online_start_falls_back_to_offline(offline, monkeypatch):
    import wandb

    server = socket.socket()  # accepts connections (the reachability probe passes) and never answers
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 86)
    monkeypatch.delenv("WANDB_MODE")
    modes, real_init = [], wandb.init

    def init(mode=None, **kwargs):  # what wandb.init raises when init_timeout passes
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 3.0 sec.")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    try:
        with pytest.warns(RuntimeWarning, match="online start failed .*CommError") as caught:
            tracker = make_tracker(LoggerConfig(name="wandb", init_timeout=3.0), offline / "run", {}, run_id="abc12345")
    finally:
        server.close()
    tracker.log(1, {"loss": 1.0})
    tracker.finish()
    assert modes == ["online", "offline"] and tracker.mode == "offline" and len(caught) == 1
    assert tracker.run_id != "abc12345" and tracker.run_id in str(caught[0].message)  # the failed id stays busy
    (path,) = wandb_files(offline)
    assert read_wandb_run(path)["run_id"] == tracker.run_id


def test_none_logger_never_touches_wandb(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise ImportError
    monkeypatch.delenv("WANDB_MODE")
    run_dir = offline / "run"
    tracker = make_tracker(LoggerConfig(name="none"), run_dir, {"sae": {"name": "topk"}})
    tracker.log(1, STEP_METRICS)
    tracker.log_histograms(1, {"decoder_norm": np.ones(4)})
    tracker.log_images(1, {"fig": offline / "missing.png"})
    tracker.log_artifact("sae", "sae", offline, table={"density": np.zeros(4)}, aliases=["latest"])
    tracker.finish()
    assert tracker.run_id is None and not run_dir.exists()
    assert not [p for p in offline.rglob("*") if p.is_file()]


def test_importing_tracking_and_logging_to_none_does_not_import_wandb(tmp_path):
    code = (
        "import sys; from pathlib import Path; from sae.tracking import LoggerConfig, make_tracker; "
        "t = make_tracker(LoggerConfig(name='none'), Path('run'), {}); t.log(1, {'loss': 1.0}); t.finish(); "
        "print('wandb' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in WANDB_ENV} | {"HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False" and not list(tmp_path.iterdir())


def test_jsonl_writes_histogram_counts_and_artifact_records(offline):
    run_dir = offline / "run"
    tracker = make_tracker(LoggerConfig(name="jsonl"), run_dir, {})
    values = np.array([0.0, 0.0, 1.0, 2.0, 2.0, 2.0, -np.inf])
    tracker.log(5, {"loss": 1.0})  # scalars are the loop's metrics.jsonl
    tracker.log_histograms(5, {"feature_density_log10": values})
    tracker.log_histograms(10, {"decoder_norm": np.arange(10.0)})
    tracker.log_artifact("dict", "sae", sae_export(offline), table={"density": np.zeros(3)}, aliases=["latest"])
    tracker.finish()
    assert tracker.run_id is None
    lines = [json.loads(line) for line in (run_dir / "histograms.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10]
    h = lines[0]["feature_density_log10"]
    assert len(h["counts"]) == 64 and len(h["bin_edges"]) == 65
    assert h["counts"][0] == 2 and h["counts"][32] == 1 and h["counts"][-1] == 3 and sum(h["counts"]) == 6
    assert h["bin_edges"][0] == 0.0 and h["bin_edges"][-1] == 2.0
    assert h["n"] == 7 and h["n_nonfinite"] == 1 and h["mean"] == pytest.approx(7 / 6)
    assert lines[1]["decoder_norm"]["counts"] == np.histogram(np.arange(10.0), bins=64)[0].tolist()
    (record,) = [json.loads(line) for line in (run_dir / "artifacts.jsonl").read_text().splitlines()]
    assert record["files"] == ["cfg.json", "sae_weights.safetensors"] and record["aliases"] == ["latest"]
    assert record["table"] == {"name": "feature_stats", "columns": ["density"], "rows": 3}
    assert sorted(p.name for p in run_dir.iterdir()) == ["artifacts.jsonl", "histograms.jsonl"]
    assert not wandb_files(offline)


def test_log_toy_run_logs_figures_and_results(offline):
    from PIL import Image

    run_dir = offline / "toy"
    run_dir.mkdir()
    settings = [
        {
            "feature_probability": p,
            "loss": 0.1 * i,
            "n_represented": 2 + i,
            "represented": [0, 1],
            "dimensions_per_feature": 1.0 / (i + 1),
            "feature_norms": [1.0, 0.5],
        }
        for i, p in enumerate([1.0, 0.1])
    ]
    metrics = {
        "experiment": "intro",
        "config": {"model": {"n_features": 5}},
        "n_settings": 2,
        "n_instances": 4,
        "seconds": 1.5,
        "steps_per_s": 100.0,
        "settings": settings,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    np.savez(run_dir / "results.npz", W=np.zeros((2, 2, 5)))
    for name in ("wtw", "loss"):
        Image.new("RGB", (8, 6), "white").save(run_dir / f"{name}.png")

    run_id = log_toy_run(run_dir, LoggerConfig(name="wandb"))
    (path,) = wandb_files(offline / "wandb_dir")
    run = read_wandb_run(path)
    assert run["run_id"] == run_id and run["config"]["model"] == {"n_features": 5}
    images = {k: v for row in run["history"] for k, v in row.items() if k.startswith("images/")}
    assert set(images) == {"images/wtw", "images/loss"}
    assert images["images/wtw"]["_type"] == "image-file" and images["images/wtw"]["width"] == 8
    (artifact,) = run["artifacts"]
    assert artifact["type"] == "toy_model" and artifact["name"] == "toy-intro" and artifact["aliases"] == ["latest"]
    assert set(artifact["files"]) == {"results.npz", "metrics.json", "settings.table.json"}
    assert artifact["metadata"]["experiment"] == "intro" and artifact["metadata"]["n_settings"] == 2
    staged = json.loads(Path(artifact["files"]["settings.table.json"]).read_text())
    assert staged["columns"] == ["setting", "feature_probability", "loss", "n_represented", "dimensions_per_feature"]
    assert staged["data"] == [[0, 1.0, 0.0, 2, 1.0], [1, 0.1, 0.1, 3, 0.5]]
    assert np.load(artifact["files"]["results.npz"])["W"].shape == (2, 2, 5)


def test_metric_names_follow_saelens():
    assert SAELENS_NAMES["loss"] == "losses/overall_loss" and SAELENS_NAMES["l0"] == "metrics/l0"
    out = to_wandb_metrics(
        {
            "step": 7,
            "loss": 1.0,
            "fvu": 0.25,
            "dead_fraction": 0.125,
            "sparsity_coefficient": 3.0,
            "l0_loss": 0.5,
            "mmcs": 0.9,
            "eval/custom": 2.0,
        },
        sae_name="jumprelu",
        d_sae=16,
    )
    assert out == {
        "losses/overall_loss": 1.0,
        "metrics/fvu": 0.25,
        "sparsity/dead_fraction": 0.125,
        "details/l0_coefficient": 3.0,
        "losses/l0_loss": 0.5,
        "metrics/mmcs": 0.9,
        "eval/custom": 2.0,
        "metrics/explained_variance": 0.75,
        "sparsity/dead_features": 2.0,
    }
    assert to_wandb_metrics({"sparsity_coefficient": 3.0, "gate_aux_loss": 0.1}, sae_name="gated") == {
        "details/l1_coefficient": 3.0,
        "losses/auxiliary_reconstruction_loss": 0.1,
    }
    assert to_wandb_metrics({"sparsity_coefficient": 0.0, "auxk_loss": 0.1}, sae_name="topk") == {
        "losses/auxiliary_reconstruction_loss": 0.1
    }  # SAELens's TopK has no coefficient


def test_histogram_of_only_nonfinite_values():
    h = histogram(np.array([-np.inf, np.nan]))
    assert sum(h["counts"]) == 0 and h["n_nonfinite"] == 2 and h["mean"] is None


def test_mode_selection(tmp_path):
    assert resolve_mode(None, {}) == "offline"
    assert resolve_mode(None, {"WANDB_API_KEY": "key"}) == "online"
    assert resolve_mode(None, {"WANDB_API_KEY": "key", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("online", {"WANDB_API_KEY": "key", "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("offline", {"WANDB_API_KEY": "key"}) == "offline"
    assert resolve_mode("online", {}) == "offline"  # no key: never a login prompt
    assert resolve_mode(None, {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("online", {"WANDB_API_KEY": "key", "WANDB_DISABLED": "true"}) == "disabled"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert resolve_mode(None, {"HOME": str(tmp_path)}) == "online"
    assert resolve_mode(None, {"NETRC": str(netrc)}) == "online"
    assert resolve_mode(None, {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    assert resolve_mode(None, {"HOME": str(tmp_path / "nowhere")}) == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_mode(None, {"WANDB_MODE": "sometimes"})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"name": "tensorboard"}, "logger.name"),
        ({"mode": "sometimes"}, "logger.mode"),
        ({"project": " "}, "logger.project"),
        ({"histogram_every": 0}, "logger.histogram_every"),
        ({"tags": ["ok", ""]}, "logger.tags"),
        ({"init_timeout": 0.0}, "logger.init_timeout"),
    ],
)
def test_check_logger_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LoggerConfig(**change).check()
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_tracker(LoggerConfig(**change), Path("unused"), {})


@pytest.mark.parametrize("name", ["wandb", "jsonl", "none"])
def test_logger_yaml_composes_into_the_schema(name):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose(overrides=[f"+logger={name}", "logger.histogram_every=7"])
        with pytest.raises(Exception, match="projekt"):
            compose(overrides=[f"+logger={name}", "logger.projekt=x"])
    logger = OmegaConf.to_object(cfg.logger)
    assert isinstance(logger, LoggerConfig) and logger.name == name and logger.histogram_every == 7
    logger.check()
