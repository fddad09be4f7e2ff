"""Where the Triton kernels run: on a CUDA GPU, or through Triton's interpreter on the CPU.

Must be imported before any `@triton.jit` kernel is defined: Triton decides at decoration time
whether a kernel is compiled or interpreted (`triton.knobs.runtime.interpret`, read from the
TRITON_INTERPRET environment variable).
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("hf_flashattn")


def _choose_mode() -> bool:
    if "TRITON_INTERPRET" in os.environ:
        return os.environ["TRITON_INTERPRET"].strip().lower() in ("1", "true", "on", "yes")
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    logger.warning("hf_flashattn: no CUDA GPU found; the Triton kernels run on the CPU through Triton's "
                   "interpreter (TRITON_INTERPRET=1). This is for testing: it is slow, and bf16 is not "
                   "reliable there (use float16 or float32 on the CPU).")
    return True


def _release(version: str) -> tuple:
    """(major, minor) of a version string ("3.6.0+git..." -> (3, 6)); (0, 0) where it cannot be read."""
    from packaging.version import InvalidVersion, Version
    try:
        return (Version(version).release + (0,))[:2]
    except InvalidVersion:
        return 0, 0


def interpreter_problem(triton_version: str, numpy_version: str):
    """Why Triton's interpreter cannot run the kernels with these versions, with the fix, or None. Triton 3.6's
    interpreter turns a scalar into a one-element array and a `range()` bound into an int with int(array), which
    NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with a loop over
    key blocks fails. Triton 3.7 fixed it; NumPy 2.3 still accepts it."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"hf_flashattn: Triton {triton_version}'s interpreter cannot run these kernels with NumPy "
                f"{numpy_version} (it converts one-element arrays to Python ints, which NumPy 2.4 rejects). Install "
                "'numpy<2.4' or 'triton>=3.7' for the CPU interpreter; on a GPU the kernels are compiled and this "
                "does not apply.")
    return None


INTERPRET: bool = _choose_mode()
if INTERPRET:
    import triton
    try:
        import numpy
    except ImportError:   # Triton's interpreter itself needs NumPy and will say so
        numpy = None
    _problem = interpreter_problem(triton.__version__, numpy.__version__) if numpy is not None else None
    if _problem:
        logger.warning(_problem)


def is_interpreting() -> bool:
    """True when the kernels run through Triton's CPU interpreter."""
    return INTERPRET


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = getattr(os.environ, "encodekey", None)
_ENV_VALUE = getattr(os.environ, "decodevalue", None)
_ENV_KEYS: dict = {}


def env_get(name: str, default: str) -> str:
    """os.environ.get(name, default), read on every call as that is, in a tenth of its time: the decode step
    of generate() reads two switches per layer, and os.environ.get of an unset variable costs ~1.7 us (a
    caught KeyError). This reads os.environ's own mapping, which its setters (and monkeypatch.setenv) keep
    current; where os.environ is laid out otherwise, os.environ.get."""
    if _ENV_DATA is None or _ENV_KEY is None or _ENV_VALUE is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _ENV_KEY(name)
    value = _ENV_DATA.get(key)
    return default if value is None else _ENV_VALUE(value)


def is_hopper(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    hopper = _HOPPER.get(index)
    if hopper is None:
        hopper = _HOPPER[index] = torch.cuda.get_device_capability(index)[0] == 9
    return hopper


_HOPPER: dict = {}   # device index -> sm90 (asked once: the query costs microseconds per call)
