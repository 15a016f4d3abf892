"""Command-line overrides checked against the schemas before Hydra runs, each mistake in one line.

Hydra lets `+key=` and `++key=` add a key that the schema lacks, and the typed config then drops it without
a word; its own composition errors run to several lines and list internal `*_schema` entries.
`check_overrides` composes the config as Hydra will (every value of a `-m` sweep included) and rejects a key
the schema does not have however it is given (`key=`, `+key=`, `++key=`, `~key`), naming the key and the
nearest valid one; an unknown group option names the tool's options; a wrong type names the key and the value;
bad override syntax names the token. Any other Hydra or OmegaConf composition error is cut to one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException

from sae.errors import ConfigError

SYNTAX = "write key=value, +key=value, ~key or group=option"
SWEEP_VALUES_CHECKED = 1000  # of a range sweep: the first ones (each is one OmegaConf update)


class ToolConfig(NamedTuple):
    """A tool's composed config (with its `hydra` node) and its own config groups: {group: options}."""

    cfg: DictConfig
    groups: dict[str, list[str]]
    choices: dict[str, str | None]


# --- composing ------------------------------------------------------------------------------------


@contextmanager
def hydra_context(config_dir: Path) -> Iterator[None]:
    """Hydra initialised on config_dir, as `hydra.main` will be (restored on exit)."""
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        yield


def group_options(group: str) -> list[str]:
    """A group's options, without the internal `*_schema` entries (inside `hydra_context`)."""
    options = GlobalHydra.instance().config_loader().get_group_options(group)
    return sorted(o for o in options if not o.endswith("_schema"))


def compose_tool(config_name: str, overrides: list[str]) -> ToolConfig:
    """The composed config and the tool's own groups (inside `hydra_context`); ConfigError in one line."""
    cfg = _compose(config_name, overrides)
    # not Hydra's own groups, nor a group chosen for the user by interpolation (toy_sae_sae@sae: ${sae})
    choices = {g: o for g, o in cfg.hydra.runtime.choices.items() if not g.startswith("hydra/") and "@" not in g}
    return ToolConfig(cfg, {g: group_options(g) for g in choices}, choices)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    """Hydra's or OmegaConf's composition error as one line, without internal names."""
    text = str(err)
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^']+)'", text) or re.search(r"'([^']+)'", text)
        if found and "/" in found.group(1):  # a group option that does not exist: "sae/topkk"
            group, option = found.group(1).rsplit("/", 1)
            return f"{group}={option} is not one of {', '.join(group_options(group))}"
        return text.splitlines()[0]
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        return _ambiguous(ambiguous.group(1))
    missing_key = re.match(r"Could not (?:override|append to) '([^']+)'", text)
    if missing_key and "No match in the defaults list" in text:
        return f"{missing_key.group(1)} is not a config group of this tool"
    if missing_key:
        return f"{missing_key.group(1)} is not a key of this config" + (
            f" (to add it, write +{text.split('+', 1)[1].strip()})" if "use +" in text else ""
        )
    cause = err
    if isinstance(err, HydraException):  # the OmegaConf error it wraps, if any
        cause = next((e for e in (err.__cause__, err.__context__) if isinstance(e, OmegaConfBaseException)), err)
    message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    full_key = getattr(cause, "full_key", None)
    where = re.match(r"In '([^']+)': \w+ raised while composing", text)  # a conf/ file's own key
    where = f"conf/{where.group(1)}.yaml: " if where else ""
    return f"{where}{full_key}: {message}" if full_key else f"{where}{message}"


def _ambiguous(token: str) -> str:
    return f"{token}: a list is written [a,b], a string 'a,b'; to sweep over the values, add -m"


# --- parsing --------------------------------------------------------------------------------------


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The command line as Hydra's own parser reads it (flags, `overrides`); ConfigError for a bad flag."""
    parser = get_args_parser()

    def error(message: str) -> None:
        raise ConfigError(f"{message} (see --help)")

    parser.error = error
    args = parser.parse_args(argv)
    if args.run + (args.cfg is not None) + args.multirun + args.shell_completion + (args.info is not None) > 1:
        raise ConfigError("give only one of --run, --multirun (-m), --cfg, --info and --shell-completion")
    return args


def parse(token: str) -> Override:
    """One command-line override, or ConfigError naming the token and what is wrong with it."""
    try:
        [override] = OverridesParser.create().parse_overrides([token])
    except HydraException as err:
        raise ConfigError(f"{token}: not an override ({_syntax_problem(str(err))}); {SYNTAX}") from None
    if not override.key_or_group:
        raise ConfigError(f"{token}: not an override (no key before '='); {SYNTAX}")
    return override


def _syntax_problem(message: str) -> str:
    """What Hydra's override parser found wrong, in a few words."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("See https")]
    lexer = next((i for i, line in enumerate(lines) if line.startswith("LexerNoViableAltException: ")), None)
    if lexer is not None and lexer + 1 < len(lines) and lines[lexer + 1].strip() == "^":
        text, at = lines[lexer][len("LexerNoViableAltException: ") :], lines[lexer + 1].index("^")
        at -= len("LexerNoViableAltException: ")
        return f"unexpected {text[at]!r} at character {at + 1}" if 0 <= at < len(text) else "unexpected character"
    lines = [line for line in lines if not line.startswith("Error parsing override")]
    return lines[0].split(" expecting ")[0] if lines else "bad syntax"


# --- keys -----------------------------------------------------------------------------------------


def leaf_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key below a composed node (the `hydra` node left out at the root)."""
    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        if not prefix and key == "hydra":
            continue
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += leaf_keys(child, f"{full}.")
    return keys


def nearest(key: str, keys: list[str]) -> str | None:
    """The valid key the user most likely meant: the same last name elsewhere (trainer.lr -> optim.lr),
    else the closest spelling."""
    keys = [k for k in keys if not key.startswith(f"{k}.")]  # not the key's own parents
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if same_name:
        return same_name[0]
    alike = [k for k in keys if difflib.SequenceMatcher(None, last, k.rsplit(".", 1)[-1]).ratio() >= 0.5]
    close = difflib.get_close_matches(key, alike, n=1, cutoff=0.6)
    return close[0] if close else None


def _is_schema(node: DictConfig) -> bool:
    """Whether the node's keys are fixed by a dataclass schema (a plain dict node takes any key)."""
    return dataclasses.is_dataclass(OmegaConf.get_type(node))


def _visible(keys) -> list[str]:
    return [str(k) for k in keys if k != "hydra"]


def check_key(cfg: DictConfig, override: Override) -> None:
    """ConfigError unless the override's key is one the composed config has (or an open dict takes)."""
    key = override.key_or_group
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
        if part not in node.keys() or (i == 0 and part == "hydra"):  # `in` is False for a missing (???) value
            if not _is_schema(node):
                return  # an open dict (e.g. sae-inspect's data overrides): any key
            close = nearest(key, leaf_keys(cfg))
            hint = f"did you mean {close}?" if close else f"valid keys here: {', '.join(_visible(node.keys()))}"
            raise ConfigError(f"{key} is not a key of this config ({hint})")
        parent, node = node, node._get_node(part)
    if override.is_delete() and _is_schema(parent):
        raise ConfigError(f"~{key}: a key of the schema cannot be deleted; give it a value ({key}=...)")
    if isinstance(node, DictConfig) and _is_schema(node) and override.value_type == ValueType.ELEMENT:
        if not isinstance(override.value(), dict) and not override.is_delete():
            raise ConfigError(f"{key} is a group of keys ({', '.join(_visible(node.keys())[:6])}, ...), not a value")


def _check_sweep_values(cfg: DictConfig, override: Override) -> None:
    """Each value of a key's `-m` sweep must fit the key's type (set on cfg, as Hydra will per job)."""
    key = override.key_or_group
    for value in itertools.islice(override.sweep_iterator(), SWEEP_VALUES_CHECKED):
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=override.is_force_add() or override.is_add())
        except OmegaConfBaseException as err:
            raise ConfigError(_one_line(err)) from None


def _check_sweep_options(override: Override, options: list[str]) -> None:
    """Each option of a group's `-m` sweep must exist."""
    group = override.key_or_group
    for option in override.sweep_iterator():
        if str(option) not in options:
            raise ConfigError(f"{group}={option} is not one of {', '.join(options)}")


def _check_interpolations(cfg: DictConfig) -> None:
    """Every `${...}` of the tool's own keys resolves to a value of its key's type."""
    for key in _visible(cfg.keys()):
        try:
            if isinstance(cfg._get_node(key), (DictConfig, ListConfig)):
                OmegaConf.to_container(cfg._get_node(key), resolve=True, throw_on_missing=False)
            elif not cfg._get_node(key)._is_missing():
                cfg[key]  # noqa: B018 - resolves and validates the value
        except InterpolationToMissingValueError:
            pass  # a `???` it points to is reported, as one line, when the run starts
        except OmegaConfBaseException as err:
            raise ConfigError(_one_line(err)) from None


def _enumerable(override: Override) -> bool:
    return override.value_type in (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)


# --- the check ------------------------------------------------------------------------------------


def check_overrides(
    config_dir: Path, config_name: str, args: list[str], groups: set[str] | None = None, multirun: bool | None = None
) -> None:
    """Raise ConfigError (one line) for the first override the composed config cannot take.

    args: the command line's overrides (flags, starting with '-', are skipped); groups: the config groups
    (`sae`, `data`, ...) whose overrides choose an option rather than set a key; None: the tool's own, from
    its defaults list; multirun: whether `-m` is given (None: whether args hold it). With a group's `-m`
    sweep, every key is checked against every option of it.
    """
    parsed = [(t, parse(t)) for t in args if not t.startswith("-")]
    if not (any(a in ("-m", "--multirun") for a in args) if multirun is None else multirun):
        for token, o in parsed:
            if o.is_sweep_override():
                raise ConfigError(_ambiguous(token))
    with hydra_context(config_dir):
        own = set(compose_tool(config_name, []).groups) if groups is None else groups
        swept = [o for _, o in parsed if o.key_or_group in own and o.is_sweep_override() and _enumerable(o)]
        for o in swept:
            _check_sweep_options(o, group_options(o.key_or_group))
        for variant in [f"{o.get_key_element()}={v}" for o in swept for v in o.sweep_iterator()] or [None]:
            try:
                _check_job(config_name, parsed, own, [variant] if variant else [])
            except ConfigError as err:
                raise ConfigError(f"{err} (in the -m job with {variant})" if variant else str(err)) from None


def _check_job(config_name: str, parsed: list[tuple[str, Override]], groups: set[str], variant: list[str]) -> None:
    """The checks for one job: its group options (variant: one value of a group's sweep) and every key."""
    mine = [o for _, o in parsed if not o.is_hydra_override()]
    chosen = [t for t, o in parsed if o.key_or_group in groups and not o.is_sweep_override()]
    cfg = _compose(config_name, chosen + variant)
    for o in mine:
        if o.key_or_group not in groups:
            check_key(cfg, o)
            if o.is_sweep_override() and _enumerable(o):
                _check_sweep_values(cfg, o)
    _check_interpolations(_compose(config_name, [t for t, o in parsed if not o.is_sweep_override()] + variant))
