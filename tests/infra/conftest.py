"""Makes the repository root importable, so the infra tests can `import infra.local.cluster`
however pytest was started (`python -m pytest` adds the working directory, plain `pytest` does not)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
