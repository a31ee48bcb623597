"""The software-TPM fixtures (swtpm_fixture.py), for the tests here; tests/vault imports them too."""

from .swtpm_fixture import swtpm, swtpm_ca, swtpm_factory  # noqa: F401
