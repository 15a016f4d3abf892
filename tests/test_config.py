"""Defaults in one place: every conf/ group composes to its Python schema's defaults (or differs only where
the file says so), the CLI and the Python API train the same SAE, and a key the schema lacks is an error
however it is given (sae/overrides.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from sae.architectures import FAMILIES
from sae.cli import CONF_DIR, register_schemas
from sae.config import CacheConfig, Config, LoggerConfig, MeshConfig, TrainerConfig
from sae.data import BATCH_SOURCES, ROW_SOURCES
from sae.data.synthetic import SyntheticConfig, SyntheticRowsConfig
from sae.errors import ConfigError
from sae.inspect.config import InspectConfig
from sae.lm.config import LMTrainConfig
from sae.overrides import check_overrides
from sae.training import train
from toy_models import config as toy_config

GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


@pytest.fixture(scope="module", autouse=True)
def schemas():
    register_schemas()
    toy_config.register()


def composed(config_name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))


def container(node) -> dict:
    return OmegaConf.to_container(node if OmegaConf.is_config(node) else OmegaConf.structured(node), resolve=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def python_default(group: str, name: str):
    """What the Python API gives for a group option with no arguments."""
    if group == "sae":
        return FAMILIES[name].config()
    if group == "data":
        return BATCH_SOURCES[name].schema()
    if group == "source":
        return ROW_SOURCES[name].schema()
    if group == "logger":
        return LoggerConfig(name=name)
    if group == "mesh":
        return MeshConfig()
    raise KeyError(group)


def test_every_group_is_covered():
    assert GROUPS == {"sae", "data", "source", "logger", "mesh", "toy", "toy_sae_sae"}
    assert set(options("toy_sae_sae")) <= set(FAMILIES)  # toy-sae's sizes for a family (conf/toy_sae.yaml)
    assert options("sae") == sorted(FAMILIES) and options("data") == sorted(BATCH_SOURCES)
    assert options("source") == sorted(ROW_SOURCES)


@pytest.mark.parametrize("group, name", [(g, n) for g in ("sae", "data", "logger", "mesh") for n in options(g)])
def test_train_group_composes_to_the_python_default(group, name):
    cfg = composed("train", [f"{group}={name}"])
    assert container(cfg[group]) == container(python_default(group, name))


@pytest.mark.parametrize("name", options("source"))
def test_cache_source_composes_to_the_python_default(name):
    assert container(composed("cache", [f"source={name}"]).source) == container(python_default("source", name))


@pytest.mark.parametrize(
    "config_name, default",
    [
        ("train", Config(sae=FAMILIES["topk"].config(), data=SyntheticConfig())),
        ("cache", CacheConfig(source=SyntheticRowsConfig())),
        ("lm_train", LMTrainConfig()),
        ("inspect", InspectConfig()),
    ],
)
def test_primary_config_composes_to_the_python_default(config_name, default):
    assert container(composed(config_name)) == container(default)


@pytest.mark.parametrize("name", options("toy"))
def test_toy_experiment_composes_into_its_schema(name):
    """conf/toy/ files pin a paper experiment's setup: every key they set is the schema's, and valid."""
    cfg = OmegaConf.to_object(composed("toy_train", [f"toy={name}"]))
    assert isinstance(cfg, toy_config.ToyConfig) and cfg.experiment == name
    toy_config.check(cfg)


def test_toy_sae_differs_only_where_it_says():
    cfg = OmegaConf.to_object(composed("toy_sae", ["data.run=RUN"]))
    default = Config(sae=FAMILIES["relu"].config(), data=BATCH_SOURCES["toy"].schema(run="RUN"))
    changed = {
        f"{part}.{f.name}"
        for part in ("sae", "trainer")
        for f in dataclasses.fields(getattr(cfg, part))
        if getattr(getattr(cfg, part), f.name) != getattr(getattr(default, part), f.name)
    }
    assert changed == {
        "sae.d_sae",
        "sae.l1_coefficient",
        "trainer.total_tokens",
        "trainer.batch_size",
        "trainer.log_every",
        "trainer.dead_tokens",
        "trainer.geometric_median_samples",
    }
    assert dataclasses.replace(cfg, sae=default.sae, trainer=default.trainer) == default


def leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml") if p.parent.name != "toy")
)
def test_no_conf_file_restates_a_default(path):
    """A value in a conf file that equals the schema's default is a second copy that can drift.
    (conf/toy/ files are exempt: each pins a paper experiment's full setup.)"""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / path), resolve=False)
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    group, name = (path.split("/")[0], Path(path).stem) if "/" in path else (None, Path(path).stem)
    group = "sae" if group == "toy_sae_sae" else group  # toy-sae's sizes for one family (conf/toy_sae.yaml)
    if group:
        default = leaves(container(LoggerConfig() if group == "logger" else python_default(group, name)))
    else:
        default = leaves(
            container(
                {
                    "train": Config(sae=FAMILIES["topk"].config(), data=SyntheticConfig()),
                    "toy_sae": Config(sae=FAMILIES["relu"].config(), data=BATCH_SOURCES["toy"].schema()),
                    "cache": CacheConfig(source=SyntheticRowsConfig()),
                    "lm_train": LMTrainConfig(),
                    "inspect": InspectConfig(),
                    "toy_train": toy_config.ToyConfig(),
                }[name]
            )
        )
    restated = {k: v for k, v in leaves(raw).items() if k in default and default[k] == v}
    assert not restated, f"conf/{path} restates defaults {restated}"


# --- the CLI and Python train the same SAE ------------------------------------------------------------


@pytest.mark.parametrize("family", ["jumprelu", "relu_april"])
def test_cli_and_python_train_identical_weights(tmp_path, family):
    budget = ["trainer.total_tokens=16384", "trainer.batch_size=2048", "data.eval_tokens=2048", "sae.d_sae=64"]
    cli = OmegaConf.to_object(composed("train", [f"sae={family}", *budget]))
    python = Config(
        sae=FAMILIES[family].config(d_sae=64),
        data=SyntheticConfig(eval_tokens=2048),
        trainer=TrainerConfig(total_tokens=16384, batch_size=2048),
    )
    assert cli == python
    weights = []
    for run, cfg in (("cli", cli), ("python", python)):
        train(cfg, tmp_path / run)
        weights.append(load_file(str(tmp_path / run / "sae" / "sae_weights.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])


# --- keys the schema lacks ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_misspelt_key_is_an_error_however_given(prefix):
    with pytest.raises(ConfigError, match=r"^trainer\.totl_tokens is not a key .*did you mean trainer\.total_tokens\?"):
        check_overrides(CONF_DIR, "train", [f"{prefix}trainer.totl_tokens=5"], GROUPS)
    with pytest.raises(ConfigError, match=r"^sae\.kk is not a key .*did you mean sae\.k\?"):
        check_overrides(CONF_DIR, "train", ["sae=batchtopk", f"{prefix}sae.kk=5"], GROUPS)


def test_valid_overrides_pass_and_other_mistakes_are_one_line():
    check_overrides(
        CONF_DIR,
        "train",
        ["sae=jumprelu", "sae.l0_coefficient=0.1", "++seed=3", "hydra.run.dir=x", "-m", "sweep.values=[1,2]"],
        GROUPS,
    )
    check_overrides(CONF_DIR, "inspect", ["run=R", "+data.path=STORE"], GROUPS)  # an open dict takes any key
    with pytest.raises(ConfigError, match=r"^sae=topkk is not one of batchtopk, clt, gated, .*topk$"):
        check_overrides(CONF_DIR, "train", ["sae=topkk"], GROUPS)
    with pytest.raises(ConfigError, match=r"^trainer\.total_tokens: Value 'abc'"):
        check_overrides(CONF_DIR, "train", ["trainer.total_tokens=abc"], GROUPS)
    with pytest.raises(ConfigError, match=r"^model\.n_layrs is not a key .*model\.n_layers"):
        check_overrides(CONF_DIR, "lm_train", ["+model.n_layrs=2"], GROUPS)


@pytest.mark.slow
def test_sae_train_refuses_a_plus_typo_in_one_line(tmp_path):
    script = CONF_DIR.parent / "scripts" / "train_sae.py"
    proc = subprocess.run(
        [sys.executable, str(script), "+trainer.totl_tokens=5", f"hydra.run.dir={tmp_path}/r"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: trainer.totl_tokens is not a key of this config (did you mean trainer.total_tokens?)"
    ]
    assert not (tmp_path / "r").exists()
