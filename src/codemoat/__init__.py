"""codemoat: a private AI coding service with sealed, licensed, traceable models."""

__version__ = "0.1.0"
