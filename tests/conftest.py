from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Exact maths in float64, and every test starts from the same random state."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
