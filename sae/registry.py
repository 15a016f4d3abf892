"""A registry from config name to entry, filled by the modules that implement the entries.

Each entry registers itself next to its code (`REGISTRY.register(name, entry)`); the registry imports every
module of its packages on first lookup, so adding an entry is adding its module: no table elsewhere lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

from sae.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name. key: the config key that names an entry (in error messages, e.g. "sae");
    packages: the packages whose modules hold the registrations."""

    def __init__(self, key: str, packages: tuple[str, ...]):
        self.key, self.packages = key, packages
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.key}={name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _discover(self) -> dict[str, T]:
        if not self._discovered:
            self._discovered = True
            for package in self.packages:
                path = importlib.import_module(package).__path__
                for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
                    importlib.import_module(f"{package}.{info.name}")
        return self._entries

    def __getitem__(self, name: str) -> T:
        entries = self._discover()
        if name not in entries:
            raise ConfigError(f"{self.key}={name!r} is not one of {sorted(entries)}")
        return entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._discover()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._discover()))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._discover().items())
