"""One line per mistake in every tool: Hydra's composition errors reworded (sae/overrides.py), `--help` listing
the tool's own groups and keys (sae/help.py), a damaged export in sae-inspect and a binary file in an lm-train
corpus, each named in one line with exit status 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from sae import cli
from sae.architectures import FAMILIES, make_sae
from sae.config import CorpusConfig, LoggerConfig
from sae.export import WEIGHTS_FILENAME, export_sae
from sae.help import TOOLS, keys_with_notes
from sae.lm.config import LMCorpusConfig, LMTrainConfig
from sae.lm.text import CorpusError, find_corpus
from sae.lm.train import train_lm
from sae.overrides import compose_tool, hydra_context
from toy_models import config as toy_config

ENTRY = {name: getattr(cli, name) for name in ("train", "toy_sae", "cache", "inspect", "toy_train", "lm_train")}
OPTIONS = "batchtopk, clt, gated, jumprelu, matryoshka, relu, relu_april, topk"


@pytest.fixture(scope="module", autouse=True)
def schemas():
    cli.register_schemas()
    toy_config.register()


def run_tool(monkeypatch, capsys, tool: str, args: list[str]) -> tuple[int, str, str]:
    """A console script run in-process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [TOOLS[tool], *args])
    with pytest.raises(SystemExit) as stop:
        ENTRY[tool]()
    out, err = capsys.readouterr()
    code = stop.value.code
    return (code if isinstance(code, int) else 1), out, err


def assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert "_schema" not in err


# --- Hydra's composition errors, one line each -----------------------------------------------------------

COMPOSITION = {  # name -> (tool, overrides, text the one line holds)
    "unknown_key": ("train", ["sae.d_saee=5"], "sae.d_saee is not a key of this config (did you mean sae.d_sae?)"),
    "key_of_another_group": (
        "train",
        ["trainer.lr=abc"],
        "trainer.lr is not a key of this config (did you mean optim.lr?)",
    ),
    "unknown_option": ("train", ["sae=nope"], f"sae=nope is not one of {OPTIONS}"),
    "wrong_type": ("train", ["optim.lr=abc"], "optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    "plus_typo": ("lm_train", ["+model.n_layrs=2"], "did you mean model.n_layers?"),
    "no_equals": ("train", ["sae.k"], "sae.k: not an override (missing EQUAL"),
    "no_key": ("cache", ["=3"], "=3: not an override (no key before '=')"),
    "bad_list": ("train", ["sae.k=[1,"], "sae.k=[1,: not an override (no viable alternative"),
    "bad_quote": ("train", ["sae.k='x"], 'not an override (unexpected "\'" at character 7)'),
    "sweep_without_m": ("train", ["sae.k=1,2"], "sae.k=1,2: a list is written [a,b]"),
    "sweep_bad_option": ("train", ["-m", "sae=topk,nope"], f"sae=nope is not one of {OPTIONS}"),
    "sweep_bad_value": ("train", ["-m", "sae.k=1,abc"], "sae.k: Value 'abc'"),
    "sweep_key_of_one_option": ("train", ["-m", "sae=relu,topk", "sae.k=3"], "(in the -m job with sae=relu)"),
    "two_commands": ("train", ["-m", "--cfg", "job"], "give only one of --run, --multirun"),
    "hydra_group": ("train", ["hydra/launcher=nope"], "hydra/launcher=nope is not one of basic"),
    "hydra_key": ("lm_train", ["hydra.foo=1"], "hydra.foo is not a key of this config"),
    "interpolation": ("train", ["sae.k=${oops}"], "sae.k: Interpolation key 'oops' not found"),
    "delete_schema_key": ("train", ["~trainer.total_tokens"], "~trainer.total_tokens: a key of the schema cannot"),
    "group_as_value": ("train", ["trainer=5"], "trainer is a group of keys"),
    "bad_flag": ("train", ["--badflag"], "unrecognized arguments: --badflag"),
    "bad_config_name": ("train", ["--config-name", "nope"], "--config-name nope: not one of cache, inspect"),
    "another_tools_group": ("cache", ["sae=topk"], "sae is not a key of this config (valid keys here: source, out"),
    "toy_sae_key": ("toy_sae", ["source.path=x"], "source.path is not a key of this config"),
    "inspect_key": ("inspect", ["run=R", "top_kk=3"], "top_kk is not a key of this config (did you mean top_k?)"),
    "toy_train_option": ("toy_train", ["toy=nope"], "toy=nope is not one of abs_large, abs_small, basic"),
    "toy_train_key": ("toy_train", ["optim.lr=1"], "did you mean train.lr?"),
    "lm_train_option": ("lm_train", ["logger=nope"], "logger=nope is not one of jsonl, none, wandb"),
}


@pytest.mark.parametrize("name", list(COMPOSITION))
def test_composition_error_is_one_line(name, monkeypatch, capsys):
    tool, overrides, expected = COMPOSITION[name]
    code, out, err = run_tool(monkeypatch, capsys, tool, overrides)
    assert_one_line(code, err, expected)
    assert out == ""


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: no Hydra banner or traceback, nothing written."""
    script = Path(ROOT) / "scripts" / "train_sae.py"
    proc = subprocess.run(
        [sys.executable, str(script), "sae=nope", f"hydra.run.dir={tmp_path / 'r'}"], capture_output=True, text=True
    )
    assert_one_line(proc.returncode, proc.stderr, f"sae=nope is not one of {OPTIONS}")
    assert not (tmp_path / "r").exists()


# --- --help ---------------------------------------------------------------------------------------------

OWN_GROUPS = {"train": {"sae", "data", "mesh", "logger"}, "cache": {"source"}, "toy_train": {"toy", "logger"}}
ALL_GROUPS = {"sae", "data", "mesh", "logger", "source", "toy"}


@pytest.mark.parametrize("tool", list(ENTRY))
def test_help_lists_the_tools_own_groups_and_keys(tool, monkeypatch, capsys):
    code, out, err = run_tool(monkeypatch, capsys, tool, ["--help"])
    assert code == 0 and err == ""
    assert out.startswith(f"usage: {TOOLS[tool]} ")
    assert "_schema" not in out
    groups = section(out, "Config groups (")
    listed = {line.split(":")[0].strip() for line in groups if not line.startswith("    ")}
    with hydra_context(cli.CONF_DIR):
        own = set(compose_tool(tool, []).groups)
    assert listed == own == OWN_GROUPS.get(tool, own)
    assert all(line.startswith("    ") and len(line.split(None, 1)) == 2 for line in groups if line.startswith("    "))
    keys = section(out, "Keys (")
    assert keys and all(line.startswith("  ") and "=" in line and len(line.split(None, 1)) == 2 for line in keys)


def section(page: str, title: str) -> list[str]:
    """The lines of a --help section, from the line after its title to the next blank line."""
    if f"\n{title}" not in page:
        return []
    return page.split(f"\n{title}", 1)[1].split("\n\n", 1)[0].splitlines()[1:]


def test_help_shows_the_chosen_options_keys(monkeypatch, capsys):
    code, out, _ = run_tool(monkeypatch, capsys, "train", ["sae=jumprelu", "--help"])
    assert code == 0
    assert "    jumprelu*  " in out and "    topk   " in out
    assert "  sae.l0_coefficient=" in out and "sae.k=" not in out


def test_every_key_of_every_tool_has_a_description():
    """Each key of each tool, under each option of its groups, has one line: its field's comment or FIELD_NOTES."""
    undescribed = set()
    with hydra_context(cli.CONF_DIR):
        for tool in TOOLS:
            groups = compose_tool(tool, []).groups
            # toy-sae's conf sets ReLU-family keys, so only its defaults compose; sae-train covers the families
            choices = [[]] if tool == "toy_sae" else [[]] + [[f"{g}={o}"] for g, opts in groups.items() for o in opts]
            for chosen in choices:
                for key, _, note in keys_with_notes(compose_tool(tool, chosen).cfg):
                    if not note:
                        undescribed.add(f"{tool}: {key} ({' '.join(chosen)})")
    assert not undescribed


# --- a damaged export in sae-inspect; a binary file in an lm-train corpus --------------------------------


def test_inspect_names_a_truncated_export(tmp_path):
    """The real sae-inspect process (Hydra's logging set up as in use): one line, exit 2, no traceback."""
    sae = make_sae(FAMILIES["relu"].config(d_sae=8), 4)
    export_sae(tmp_path / "run" / "sae", sae, sae.init_params(jax.random.PRNGKey(0), jnp.zeros(4)), {}, 1.0)
    weights = tmp_path / "run" / "sae" / WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[:100])
    code = "import sys; from sae.cli import inspect; sys.argv[0] = 'sae-inspect'; inspect()"
    args = [f"run={tmp_path / 'run'}", f"out={tmp_path / 'out'}"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line(proc.returncode, proc.stderr, f"{weights} is truncated or damaged (SafetensorError: ")
    assert "re-export the run" in proc.stderr


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n" * 20)
    return tmp_path


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "is not UTF-8 text (byte 0x89 at offset 0)"),
        ("latin1.txt", "café".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
        ("nul.txt", b"abc\x00def", "is binary, not text (a NUL byte at offset 3)"),
    ],
)
def test_corpus_rejects_a_binary_file_naming_it(corpus, name, data, expected):
    (corpus / name).write_bytes(data)
    with pytest.raises(CorpusError) as refused:
        find_corpus(CorpusConfig(path=str(corpus), pattern="*"))
    assert str(refused.value).startswith(f"corpus.path: {corpus / name} {expected}; give text files")
    find_corpus(CorpusConfig(path=str(corpus), pattern="*.txt" if name.endswith(".png") else "a.txt"))  # text only


def test_lm_train_names_a_binary_file_in_one_line(corpus, tmp_path, capsys):
    (corpus / "b.bin").write_bytes(np.arange(300, dtype=np.uint16).tobytes())
    cfg = LMTrainConfig(corpus=LMCorpusConfig(path=str(corpus), pattern="*"), logger=LoggerConfig(name="none"))
    code = cli.run_job(lambda: train_lm(cfg, tmp_path / "run"))
    assert_one_line(
        code, capsys.readouterr().err, f"corpus.path: {corpus / 'b.bin'} is binary, not text (a NUL byte at offset 0)"
    )
