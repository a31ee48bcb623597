import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from swtpm_fixture import swtpm, swtpm_ca, swtpm_factory  # noqa: E402,F401
