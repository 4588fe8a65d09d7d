"""Shared test setup: offline always; tiny models come from ``tests/tiny.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

# Tiny models gain nothing from intra-op threads, and `make test` runs one pytest worker per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# Hypothesis budgets: small and reproducible by default (derandomized, so CI never flakes); a longer random
# search with HYPOTHESIS_PROFILE=long (e.g. `HYPOTHESIS_PROFILE=long pytest tests/test_properties.py`).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev dependency; only the property/fuzz tests need it
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile(
        "fast",
        max_examples=10,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=_SLOW_OK,
    )
    settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=_SLOW_OK)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
