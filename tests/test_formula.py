import pytest
import torch

from pydvl_datainf import formula
from reference import auto_lambda, dense_R


@pytest.mark.parametrize("n,d,m", [(1, 3, 2), (7, 5, 4), (30, 12, 3)])
def test_sherman_morrison_equals_dense_inverse(n, d, m):
    g = torch.randn(n, d, dtype=torch.float64)
    v = torch.randn(m, d, dtype=torch.float64)
    lam = 0.37
    expected = v @ dense_R(g, lam)
    got = formula.apply_inverse_harmonic_mean(v, g, lam)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_chunked_corrections_add_up_to_the_whole():
    g = torch.randn(23, 6, dtype=torch.float64)
    v = torch.randn(4, 6, dtype=torch.float64)
    s = formula.squared_norms(g)
    lam = 0.2
    whole = formula.apply_inverse_harmonic_mean(v, g, lam, s)
    corr = sum(
        formula.inverse_harmonic_mean_correction(v, g[i : i + 5], s[i : i + 5], lam)
        for i in range(0, 23, 5)
    )
    chunked = formula.finish_inverse_harmonic_mean(v, corr, 23, lam)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-15)


def test_docstring_example_values():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = formula.apply_inverse_harmonic_mean(
        torch.tensor([[1.0, 1.0]], dtype=torch.float64), g, 1.0
    )
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.6]], dtype=torch.float64))


def test_squared_norms():
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert formula.squared_norms(g).tolist() == [25.0, 1.0]


def test_auto_regularization_matches_paper_rule():
    g = torch.randn(11, 7, dtype=torch.float64)
    lam = formula.auto_regularization(float(formula.squared_norms(g).sum()), 11, 7)
    assert lam == pytest.approx(auto_lambda(g), rel=1e-12)
    assert formula.auto_regularization(40.0, 4, 10, scale=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_non_positive_regularization_rejected(lam):
    with pytest.raises(ValueError, match="positive"):
        formula.apply_inverse_harmonic_mean(torch.ones(1, 2), torch.ones(3, 2), lam)


def test_auto_regularization_rejects_empty():
    with pytest.raises(ValueError):
        formula.auto_regularization(1.0, 0, 3)
