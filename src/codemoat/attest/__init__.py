"""Hardware roots of trust behind one `Attestor` interface (TPM 2.0 first; see `base.py`)."""

from .base import AttestError, Attestor, Quote

__all__ = ["AttestError", "Attestor", "Quote"]
