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


INTERPRET: bool = _choose_mode()


def is_interpreting() -> bool:
    """True when the kernels run through Triton's CPU interpreter."""
    return INTERPRET


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
