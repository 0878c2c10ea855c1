"""domlora: find where a LoRA adapter should go (PAGE), put it there (DomLoRA), and prove it."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "dominant_lora_config", "probe_page", "place"]


def __getattr__(name):
    # keep `import domlora` light: torch and friends load only when the API is used
    if name in ("dominant_lora_config", "probe_page", "place"):
        from domlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'domlora' has no attribute {name!r}")
