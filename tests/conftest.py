"""Shared test settings.

The test models are tiny (width 32), so intra-op threads only add synchronisation overhead. Worse, when another
process keeps the (2) cores busy, torch's spinning worker threads make these tiny forwards 10-50x slower (measured:
memorizing 2000 documents went from 0.4 s to 25 s). One thread keeps the suite fast and its timing stable.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (tests may also seed explicitly)."""
    torch.manual_seed(1234)
    yield
