"""Command-line overrides checked against the schemas before Hydra runs, each mistake in one line.

Hydra lets `+key=` and `++key=` add a key that the schema lacks, and the typed config then drops it without
a word; its own messages for `key=` typos and unknown group options run to several lines. `check_overrides`
composes the config as Hydra will and rejects a key the schema does not have however it is given (`key=`,
`+key=`, `++key=`, `~key`), naming the key and the nearest valid one; an unknown group option names the
options; a wrong type names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sae.errors import ConfigError


def _leaf_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key below a composed node."""
    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += _leaf_keys(child, f"{full}.")
    return keys


def _is_schema(node: DictConfig) -> bool:
    """Whether the node's keys are fixed by a dataclass schema (a plain dict node takes any key)."""
    return dataclasses.is_dataclass(OmegaConf.get_type(node))


def _check_key(cfg: DictConfig, key: str) -> None:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig) and part.isdigit():
            node = node._get_node(int(part)) if int(part) < len(node) else None
            if node is None:
                return
            continue
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
            where = ".".join(parts[:i])
            raise ConfigError(f"{key} is not a key: {where} is a value, not a group of keys")
        if part not in node.keys():  # `in` is False for a key whose value is still missing (???)
            if not _is_schema(node):
                return  # an open dict (e.g. sae-inspect's data overrides): any key
            close = difflib.get_close_matches(key, _leaf_keys(cfg), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"valid keys here: {', '.join(map(str, node.keys()))}"
            raise ConfigError(f"{key} is not a key of this config ({hint})")
        node = node._get_node(part)


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name, overrides=overrides)
    except MissingConfigException as err:  # "Could not find 'sae/topkk'": a group option that does not exist
        found = re.search(r"'([\w/]+)/([^'/]+)'", str(err))
        what = f"{found.group(1)}={found.group(2)}" if found else str(err).splitlines()[0]
        options = sorted(o for o in (err.options or []) if not o.endswith("_schema"))
        raise ConfigError(f"{what} is not one of {', '.join(options)}" if options else what) from None
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        full_key = getattr(cause, "full_key", None)
        raise ConfigError(f"{full_key}: {message}" if full_key else message) from None


def check_overrides(config_dir: Path, config_name: str, args: list[str], groups: set[str]) -> None:
    """Raise ConfigError (one line) for the first override the composed config cannot take.

    args: the command line after the program name; groups: the config groups (`sae`, `data`, ...), whose
    overrides choose an option rather than set a key. Flags and Hydra's own keys are left to Hydra.
    """
    tokens = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        parsed: list[Override] = OverridesParser.create().parse_overrides(tokens)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    mine = [
        (token, o)
        for token, o in zip(tokens, parsed)
        if not o.is_hydra_override() and not o.key_or_group.startswith("hydra/")
    ]
    choices = [t for t, o in mine if o.key_or_group in groups and not o.is_sweep_override()]
    cfg = _compose(config_dir, config_name, choices)
    for _, o in mine:
        if o.key_or_group not in groups:
            _check_key(cfg, o.key_or_group)
    _compose(config_dir, config_name, [t for t, o in mine if not o.is_sweep_override()])
