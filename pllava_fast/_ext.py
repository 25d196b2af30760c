"""Access to the optional C++/CUDA extension ``pllava_fast._C``.

The package works without it (pure-torch fallbacks); a missing extension is reported once.
"""
import warnings

_C = None
_tried = False


def load():
    """Return the ``pllava_fast._C`` module, or None (with one warning) when it was not built."""
    global _C, _tried
    if not _tried:
        _tried = True
        try:
            from . import _C as ext  # noqa: N813
            _C = ext
        except ImportError as exc:
            warnings.warn(
                f"pllava_fast._C is not built ({exc}); using the pure-torch fallbacks. "
                "Reinstall with `pip install --no-build-isolation -e .` to build it.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _C


def available():
    return load() is not None
