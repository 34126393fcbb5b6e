"""Models: loading by name (`presets`), what the methods need to know of a model (`adapter`) and the families
hf_robust reads it from (`families`, one table), and the built-in models (`mnist_cnn`, `clip`, `digits_clip`)."""

from importlib import import_module

_EXPORTS = {
    "load_model": ".presets",
    "PRESETS": ".presets",
    "get_adapter": ".adapter",
    "ModelAdapter": ".adapter",
    "UnsupportedModelError": ".adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
