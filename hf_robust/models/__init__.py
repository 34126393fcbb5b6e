"""Models: loading by name (`presets`), what the methods need to know of a model (`adapter`) and the families
hf_robust reads it from (`families`, one table), and the built-in models (`mnist_cnn`, `clip`, `digits_clip`)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "load_model": ".presets",
    "PRESETS": ".presets",
    "get_adapter": ".adapter",
    "ModelAdapter": ".adapter",
    "UnsupportedModelError": ".adapter",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
