"""The Inductor executor (slow: each compile takes tens of seconds on 2 cores)."""

import pytest
import torch
import torch.nn.functional as F

import lohan_compile as lohan
from models import MLP, assert_same_state, train_side_by_side

pytestmark = pytest.mark.inductor


def test_inductor_executor_matches_eager_within_tolerance():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)) for _ in range(3)]
    le, lc, eager, compiled = train_side_by_side(
        MLP, batches, lambda m, b: F.mse_loss(m(b[0]), b[1]), options={"executor": "inductor"}
    )
    for a, b in zip(le, lc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_same_state(eager, compiled, exact=False, atol=1e-5)
    report = lohan.last_report()
    assert report.graphs[0].executor == "inductor"
    assert report.summary()["kept_bytes"] > 0
