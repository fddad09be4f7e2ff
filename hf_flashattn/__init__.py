"""hf_flashattn: exact FlashAttention kernels in Triton for Hugging Face Transformers.

    import hf_flashattn
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flashattn_custom")
"""
from . import _runtime  # noqa: F401  (sets TRITON_INTERPRET before any kernel is defined)
from . import _lazy_register
from ._runtime import is_interpreting
from .interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                        flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache,
                        get_default_version, set_default_version, use_version)

__version__ = "0.1.0"
ATTN_IMPLEMENTATION = "flashattn_custom"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "set_default_version", "get_default_version", "use_version", "is_interpreting", "ATTN_IMPLEMENTATION",
           "register"]


def register() -> None:
    """Register attn_implementation="flashattn_custom" with Transformers (done automatically).

    `import hf_flashattn` registers the name as soon as `transformers.modeling_utils` is imported,
    without importing Transformers itself. Call this to register explicitly: it is idempotent, and
    raises RuntimeError if the installed Transformers changed the internals the adapter relies on.
    """
    from .integrations.transformers import register as _register
    _register()


_lazy_register.install()
