"""Where the kernels run: the one reading of ``TRITON_INTERPRET`` (Triton on CPU tensors through its interpreter),
shared by the launchers and by ``sgflow.ops.backend``. Imports nothing, so asking does not import Triton."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET`` set, not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
