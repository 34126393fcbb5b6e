"""Lazy exports: a package names its public objects by module, and imports a module only when one is used (so
that `import hf_robust` and the CLI's --help stay fast)."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]):
    """A module `__getattr__` for `package` that imports `exports[name]` (absolute, or relative to `package`) on
    first use of `name` and keeps the object in `namespace` (the package's globals)."""

    def __getattr__(name):
        if name in exports:
            value = getattr(import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
