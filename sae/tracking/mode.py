"""Which W&B mode a run gets: online only with an API key, else offline (never a login prompt)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from sae.config import WANDB_MODES


def has_api_key(environ: Mapping[str, str] | None = None) -> bool:
    """True when a W&B API key is configured: WANDB_API_KEY, or a netrc entry for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    home = environ.get("HOME") or os.path.expanduser("~")
    path = Path(environ.get("NETRC") or Path(home) / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(requested: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode to use: WANDB_MODE if set, else `requested`, else online with an API key, offline without.

    An online mode without an API key becomes offline: wandb would otherwise ask for a login and wait.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    aliases = {"dryrun": "offline", "run": "online"}
    mode = environ.get("WANDB_MODE", "").strip().lower() or requested
    mode = aliases.get(mode, mode)
    if mode is None:
        return "online" if has_api_key(environ) else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode {mode!r} (WANDB_MODE or logger.mode) must be one of {'|'.join(WANDB_MODES)}")
    if mode == "online" and not has_api_key(environ):
        return "offline"
    return mode
