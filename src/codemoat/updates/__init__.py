"""Signed update bundles, support windows, anti-rollback and crash-safe install (docs/formats.md, docs/operations.md)."""
