"""Fail early, with the fix, when torchvision does not match torch.

A CPU-only torch next to the registry's CUDA torchvision makes `import transformers` (and diffusers) die with
`operator torchvision::nms does not exist`; see docs/install.md. We check once, before those imports.
"""

from __future__ import annotations

import importlib.util


def check_torchvision() -> None:
    """Raise ImportError naming the fix if torchvision is installed but cannot load against this torch."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError) as err:
        import torch

        raise ImportError(
            f"torchvision is installed but does not load with torch {torch.__version__} ({err}). "
            "transformers and diffusers import torchvision whenever it is present, so nothing works. "
            "Fix: `pip uninstall -y torchvision open-clip-torch` (the default install needs neither), "
            "or install a matching pair from the registry (see docs/install.md, 'OpenCLIP text encoders')."
        ) from err
