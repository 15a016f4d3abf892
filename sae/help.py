"""`--help` for each tool: its own config groups with their options, and its keys with their values, each
with one line of description.

Descriptions come from the schemas themselves: a key's is the comment on its dataclass field (found by
reading the class's source), a group option's the first comment line of conf/<group>/<option>.yaml, the
tool's the comment block atop conf/<tool>.yaml. Fields that carry no comment are described in
`FIELD_NOTES` below (by `Class.field`, else by field name), groups in `GROUP_NOTES`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from sae.overrides import ToolConfig, compose_tool, hydra_context, parse

TOOLS = {  # config name -> console script (pyproject [project.scripts])
    "train": "sae-train",
    "toy_sae": "toy-sae",
    "cache": "sae-cache",
    "inspect": "sae-inspect",
    "toy_train": "toy-train",
    "lm_train": "lm-train",
}

OPTION_WIDTH = 110  # characters of a group option's description

GROUP_NOTES = {
    "sae": "the SAE family",
    "data": "the activations to train on",
    "source": "what the store is written from",
    "logger": "where curves, histograms and feature dictionaries go",
    "mesh": "devices as data × model",
    "toy": "the experiment (sets experiment, model, data and train)",
}

FIELD_NOTES = {  # fields whose dataclass has no comment on them
    "MeshConfig.data": "devices on the data axis; null: every device not used by mesh.model",
    "ArraysConfig.path": "a [n_tokens, d_in] float16/float32 .npy (memory-mapped)",
    "ToyTrainConfig.batch_size": "inputs per optimiser step",
    "TrainerConfig.batch_size": "tokens per optimiser step",
    "aux_coefficient": "weight α of the AuxK loss, which reconstructs the residual from dead latents",
    "batch_size": "rows per step",
    "beta1": "Adam β₁",
    "beta2": "Adam β₂",
    "context_after": "tokens shown after an example's token",
    "d_in": "input width: dimensions of each activation vector",
    "d_model": "residual stream width",
    "d_sae": "dictionary size: the SAE's latents",
    "entity": "W&B entity (team or user); null: the API key's default",
    "eps": "Adam ε",
    "figures": "draw the paper's figures after training",
    "geometric_median_samples": "tokens sampled for the geometric median that initialises b_dec",
    "group": "W&B run group",
    "group_size": "features per correlated group",
    "hist_max": "the activation histogram's upper end",
    "k": "active latents per token",
    "l0_coefficient": "sparsity penalty λ on the (pseudo-gradient) L0 of the latents",
    "l1_coefficient": "sparsity penalty λ on the latents' L1 norm",
    "lr": "learning rate",
    "magnitude_mean": "mean magnitude of an active feature",
    "magnitude_std": "standard deviation of an active feature's magnitude",
    "min_lr_fraction": "the cosine decay ends at this fraction of lr",
    "n_correlated_groups": "groups of features that fire together (see group_correlation)",
    "n_features": "ground-truth features",
    "n_heads": "attention heads",
    "n_layers": "transformer blocks",
    "n_rows": "rows to generate",
    "name": "the group's option (set by GROUP=OPTION)",
    "noise_std": "standard deviation of Gaussian noise added to each activation",
    "num_processes": "processes of a multi-host run; null: from the environment",
    "process_id": "this process's index in a multi-host run; null: from the environment",
    "project": "W&B project",
    "sample_tokens": "tokens per sample",
    "seed": "random seed",
    "steps": "optimiser steps",
    "tags": "W&B run tags",
    "threshold_init": "JumpReLU threshold θ at initialisation",
    "total_tokens": "training budget in tokens",
    "values": "the values of sweep.key: one SAE each",
    "warmup_steps": "steps of linear lr warm-up",
}


# --- descriptions ---------------------------------------------------------------------------------


@functools.cache
def _own_field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line(s)} for the fields cls itself declares."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    fields = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = next((n for n in range(node.end_lineno, node.lineno - 1, -1) if n in comments), None)
            if line is not None:
                fields[node.target.id] = comments[line]
    return fields


def describe_field(cls: type, name: str) -> str:
    """One line describing field `name` of the schema `cls` ('' when nothing does)."""
    for c in cls.__mro__:
        if name in _own_field_comments(c):
            return _own_field_comments(c)[name]
    for c in cls.__mro__:
        if f"{c.__name__}.{name}" in FIELD_NOTES:
            return FIELD_NOTES[f"{c.__name__}.{name}"]
    return FIELD_NOTES.get(name, "")


def _yaml_comments(path: Path) -> list[str]:
    """The comment lines atop a conf/ file, without Hydra's `@package` and the `Defaults:` pointers."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("@package", "Defaults:")):
            lines.append(line.lstrip("#").rstrip().removeprefix(" "))
    return lines


def describe_option(config_dir: Path, group: str, option: str) -> str:
    """The first sentence of the comment atop conf/<group>/<option>.yaml."""
    text = " ".join(line.strip() for line in _yaml_comments(config_dir / group / f"{option}.yaml"))
    first = re.split(r"(?<=[^.]\.)\s+(?=[A-Z])", text, maxsplit=1)[0]
    return textwrap.shorten(first, OPTION_WIDTH, placeholder=" …")


# --- keys -----------------------------------------------------------------------------------------


def _value(node) -> str:
    if node._is_missing():
        return "???"
    if node._is_none():
        return "null"
    if isinstance(node, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(node, resolve=False)).replace(" ", "")
    value = node._value()
    return str(value).lower() if isinstance(value, bool) else str(value)


def keys_with_notes(node: DictConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, description) for every key below a schema node (the `hydra` node left out)."""
    rows = []
    cls = OmegaConf.get_type(node)
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        child = node._get_node(key)
        schema = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
        if dataclasses.is_dataclass(schema) and not child._is_missing() and not child._is_none():
            rows += keys_with_notes(child, f"{prefix}{key}.")
        else:
            note = describe_field(cls, str(key)) if dataclasses.is_dataclass(cls) else ""
            rows.append((f"{prefix}{key}", _value(child), note))
    return rows


# --- the page -------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str]], indent: str = "  ", widest: int = 40) -> list[str]:
    width = min(max((len(left) for left, _ in rows), default=0), widest)
    return [f"{indent}{left:<{width}}  {note}".rstrip() for left, note in rows]


def _groups_section(config_dir: Path, tool: ToolConfig) -> list[str]:
    lines = ["Config groups (GROUP=OPTION; * the option in use):"]
    keys = list(tool.cfg.keys())
    for group, options in sorted(tool.groups.items(), key=lambda g: keys.index(g[0]) if g[0] in keys else -1):
        lines.append(f"  {group}: {GROUP_NOTES.get(group, '')}".rstrip())
        marked = [
            (f"{o}{'*' if o == tool.choices.get(group) else ''}", describe_option(config_dir, group, o))
            for o in options
        ]
        lines += _table(marked, indent="    ")
    return lines


def _keys_section(tool: ToolConfig) -> list[str]:
    chosen = ", ".join(f"{g}={o}" for g, o in tool.choices.items())
    lines = [f"Keys (KEY=VALUE, shown with their values{f' for {chosen}' if chosen else ''}; ??? = required):"]
    return lines + _table([(f"{key}={value}", note) for key, value, note in keys_with_notes(tool.cfg)])


def tool_help(config_dir: Path, config_name: str, overrides: list[str] = ()) -> str:
    """The `--help` page of the tool whose config is conf/<config_name>.yaml, with the group options chosen
    in `overrides` (other overrides are ignored here). Raises ConfigError for an unknown group option."""
    name = TOOLS.get(config_name, config_name)
    with hydra_context(config_dir):
        groups = compose_tool(config_name, []).groups
        chosen = [t for t in overrides if not t.startswith("-") and parse(t).key_or_group in groups]
        tool = compose_tool(config_name, chosen)
        choose = "[GROUP=OPTION ...] " if tool.groups else ""
        lines = [f"usage: {name} {choose}[KEY=VALUE ...] [-m KEY=A,B ...]", ""]
        lines += _yaml_comments(config_dir / f"{config_name}.yaml") + [""]
        if tool.groups:
            lines += _groups_section(config_dir, tool) + [""]
        lines += _keys_section(tool) + [""]
    run_dir = "" if "out" in tool.cfg else "hydra.run.dir=DIR sets the run directory; "
    lines.append(f"{run_dir}-m runs one job per value of KEY=A,B; --hydra-help shows Hydra's own flags.")
    return "\n".join(lines)


def print_help(text: str) -> None:
    """Print the page; a reader that stops early (`| head`) ends it without a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
