"""Register "flashattn_custom" with Transformers without importing Transformers.

`import hf_flashattn` must stay cheap, so it does not import Transformers. Instead:
  - if `transformers.modeling_utils` is already imported, register now;
  - otherwise put a one-shot finder at the front of `sys.meta_path`. When `transformers.modeling_utils`
    is imported (by `from transformers import AutoModelForCausalLM`, say), the finder lets the
    other finders locate the module, wraps its loader's `exec_module`, and calls register() right
    after the module has executed, before the import statement returns. Then it removes itself.

A failure inside the hook (Transformers' internals changed) is reported with warnings.warn instead of
being raised: raising would break `import transformers.modeling_utils` for every user of the process.
The model then fails to build with attn_implementation="flashattn_custom", and an explicit
`hf_flashattn.register()` raises the full RuntimeError.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

TARGET = "transformers.modeling_utils"


def _register_or_warn() -> None:
    from .integrations.transformers import register
    try:
        register()
    except Exception as e:  # noqa: BLE001  (reported, see the module docstring)
        warnings.warn(f"hf_flashattn: attn_implementation='flashattn_custom' is not available: {e}",
                      RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot finder: runs register() once `transformers.modeling_utils` has executed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = False  # True while we ask the other finders (stops us from answering ourselves)

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET or self._busy:
            return None
        with self._lock:
            self._busy = True
            try:
                spec = None
                for finder in list(sys.meta_path):
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
            finally:
                self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module  # bound method of this loader instance

        def exec_module(module):
            try:
                original_exec(module)
            finally:
                # Undo the instance-level patch; the class method takes over again.
                loader.__dict__.pop("exec_module", None)
            if module.__name__ == TARGET:
                uninstall()
                _register_or_warn()

        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError):  # a loader without instance attributes: cannot hook it
            warnings.warn("hf_flashattn: could not hook the import of transformers.modeling_utils; call "
                          "hf_flashattn.register() after importing transformers.", RuntimeWarning, stacklevel=2)
        return spec


_finder: _RegisterAfterImport | None = None


def install() -> None:
    """Register now if Transformers' modeling_utils is loaded, else arrange it for when it is."""
    global _finder
    if TARGET in sys.modules:
        _register_or_warn()
        return
    if _finder is None:
        _finder = _RegisterAfterImport()
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    global _finder
    if _finder is not None:
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass
        _finder = None
