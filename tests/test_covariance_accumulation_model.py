"""The truncating-accumulation model that chose the covariance kernels' row chunks
(benchmarks/covariance_accumulation_model.py): its error grows with the rows between float64
flushes, and the kernels' defaults stay well inside the 1e-5 bar under it."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import covariance_accumulation_model as model  # noqa: E402


def test_chain_is_exact_for_short_exact_sums():
    a = np.array([[1.0, 2.0], [3.0, -1.0]])
    np.testing.assert_array_equal(model.mma_chain(a, a, 16, 0), a.T @ a)


@pytest.mark.parametrize("route,default", [("split_gemm", 1024), ("tensor_core", 256)])
def test_defaults_inside_the_bar_and_error_grows_with_chunk(route, default):
    small = model.rel_error(route, default, 0, default * 2, 24)
    large = model.rel_error(route, default * 4, 0, default * 8, 24)
    assert small < 5e-6, small
    assert large > 2 * small, (small, large)
