"""Fréchet distance (genie_kernels.metrics, used by bench/mnist_fid.py): closed forms, symmetry, bad input."""

import numpy as np
import pytest
import torch

from genie_kernels.metrics import frechet_distance, frechet_distance_features, gaussian_fit, scipy_available

METHODS = ["eigh"] + (["scipy"] if scipy_available() else [])


def random_gaussian(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_gaussian_with_itself_is_zero(method):
    mu, cov = random_gaussian(32, 0)
    assert abs(frechet_distance(mu, cov, mu, cov, method=method)) < 1e-8
    feats = np.random.default_rng(1).standard_normal((500, 16))
    assert abs(frechet_distance_features(feats, feats, method=method)) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_closed_form(method):
    rng = np.random.default_rng(2)
    d = 10
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)  # variances
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_singular_covariance_closed_form():
    """A zero-variance dimension (dead ReLU feature) is fine for the eigh method."""
    s1, s2 = np.array([0.0, 1.0, 4.0]), np.array([2.0, 0.0, 1.0])
    expected = 1.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(np.zeros(3), np.diag(s1), np.array([1.0, 0, 0]), np.diag(s2), method="eigh")
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_and_methods_agree(method):
    (mu1, c1), (mu2, c2) = random_gaussian(24, 3), random_gaussian(24, 4)
    ab = frechet_distance(mu1, c1, mu2, c2, method=method)
    assert ab > 0
    assert ab == pytest.approx(frechet_distance(mu2, c2, mu1, c1, method=method), rel=1e-9)
    assert ab == pytest.approx(frechet_distance(mu1, c1, mu2, c2, method="eigh"), rel=1e-7)


def test_features_match_fit_and_accept_torch():
    rng = np.random.default_rng(5)
    f1 = rng.standard_normal((300, 8)) * 2 + 1
    f2 = rng.standard_normal((200, 8))
    mu, cov = gaussian_fit(f1)
    assert np.allclose(mu, f1.mean(0)) and np.allclose(cov, np.cov(f1, rowvar=False))
    fd = frechet_distance_features(f1, f2)
    assert fd == pytest.approx(frechet_distance(*gaussian_fit(f1), *gaussian_fit(f2)), rel=1e-12)
    assert frechet_distance_features(torch.from_numpy(f1).float(), torch.from_numpy(f2)) == pytest.approx(fd, rel=1e-5)
    # the data here: means differ by 1 in 8 dims, std 2 vs 1 -> about 8 + 8 * (4 + 1 - 4) = 16
    assert 12 < fd < 20


def test_rejects_bad_input():
    good = np.zeros((10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_features(np.zeros((1, 4)), good)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance_features(good, np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"shaped \(n, d\)"):
        frechet_distance_features(np.zeros(10), good)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="must be shaped"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance_features(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


try:
    import scipy.linalg as scipy_linalg
except ImportError:
    scipy_linalg = None
needs_scipy = pytest.mark.skipif(scipy_linalg is None, reason="scipy is not installed")


@needs_scipy
def test_scipy_retries_a_non_finite_root_with_a_small_offset(monkeypatch):
    real_sqrtm, calls = scipy_linalg.sqrtm, []

    def fails_once(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy_linalg, "sqrtm", fails_once)
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    got = frechet_distance(np.zeros(2), np.diag(s1), np.zeros(2), np.diag(s2), method="scipy")
    assert len(calls) == 2 and got == pytest.approx(np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)), rel=1e-5)


@needs_scipy
def test_scipy_refuses_a_root_with_a_large_imaginary_part(monkeypatch):
    monkeypatch.setattr(scipy_linalg, "sqrtm", lambda m: np.eye(m.shape[0]) * (1.0 + 0.5j))
    with pytest.raises(ValueError, match="complex root"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="scipy")


def test_a_large_negative_distance_is_left_visible(monkeypatch):
    from genie_kernels import metrics

    monkeypatch.setattr(metrics, "_trace_sqrt_eigh", lambda c1, c2: 10.0)  # a wrong root: FD = 2 + 2 − 20
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="eigh") == pytest.approx(-16.0)


@needs_scipy
def test_auto_uses_scipy_where_it_is_installed(monkeypatch):
    from genie_kernels import metrics

    used = []
    monkeypatch.setattr(metrics, "_trace_sqrt_scipy", lambda c1, c2: used.append("scipy") or 2.0)
    frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="auto")
    assert used == ["scipy"]
