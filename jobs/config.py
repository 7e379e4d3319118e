"""Moved: the config schema is the bottom-layer package `config` (pipelines and models import it too)."""

from config import *  # noqa: F401,F403
from config import __all__  # noqa: F401
