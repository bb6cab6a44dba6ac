"""Distribution metrics: the Fréchet distance between Gaussian fits of feature sets.

For features ``f1`` (n1 × d) and ``f2`` (n2 × d) with Gaussian fits ``N(μ1, C1)`` and
``N(μ2, C2)`` (sample mean, unbiased sample covariance), the Fréchet (2-Wasserstein²)
distance is

    FD = ‖μ1 − μ2‖² + tr(C1) + tr(C2) − 2 tr((C1 C2)^{1/2}).

``C1 C2`` is not symmetric, but it is similar to the symmetric PSD matrix
``√C1 C2 √C1`` (``√C1`` the symmetric PSD root of C1), so both have the same
non-negative eigenvalues λᵢ and ``tr((C1 C2)^{1/2}) = Σᵢ √λᵢ``.  That is the ``"eigh"``
method (two symmetric eigendecompositions in float64, tiny negative eigenvalues from
round-off clipped to 0): it needs no scipy and copes with singular covariances.
``"scipy"`` uses ``scipy.linalg.sqrtm(C1 @ C2)`` as in the FID reference code (adding
``eps·I`` to both covariances if the root comes out non-finite, and dropping an imaginary
part of round-off size); ``"auto"`` takes scipy when it is installed, else ``"eigh"``.
"""

from __future__ import annotations

import numpy as np

METHODS = ("auto", "scipy", "eigh")


def _as_float64(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (d,), unbiased covariance (d, d))`` of ``features`` shaped ``(n, d)``, float64."""
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must be shaped (n, d), got shape {f.shape}")
    n, d = f.shape
    if d < 1:
        raise ValueError("features must have at least one dimension (d >= 1)")
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a covariance, got {n}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _check_gaussian(mu, cov, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, cov = _as_float64(mu, f"mu{name}"), _as_float64(cov, f"cov{name}")
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector, got shape {mu.shape}")
    if cov.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"cov{name} must be shaped ({mu.shape[0]}, {mu.shape[0]}) to match mu{name}, got {cov.shape}")
    return mu, cov


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eigh(c1: np.ndarray, c2: np.ndarray) -> float:
    r1 = _psd_sqrt(c1)
    m = r1 @ c2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_scipy(c1: np.ndarray, c2: np.ndarray, eps: float = 1e-6) -> float:
    from scipy import linalg

    root = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(root).all():
        offset = eps * np.eye(c1.shape[0])
        root = linalg.sqrtm((c1 + offset) @ (c2 + offset))
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(root).real).max()):
            raise ValueError(f"scipy sqrtm gave a complex root (imaginary part {imag:.3g}); use method='eigh'")
        root = root.real
    return float(np.trace(root))


def scipy_available() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def frechet_distance(mu1, cov1, mu2, cov2, method: str = "auto") -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (see the module docstring).

    ``method``: ``"eigh"`` (float64 symmetric eigendecompositions), ``"scipy"``
    (``scipy.linalg.sqrtm``) or ``"auto"`` (scipy if installed, else eigh).  Raises
    ``ValueError`` for mismatched shapes or non-finite input.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    mu1, cov1 = _check_gaussian(mu1, cov1, "1")
    mu2, cov2 = _check_gaussian(mu2, cov2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two Gaussians have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    if method == "auto":
        method = "scipy" if scipy_available() else "eigh"
    tr_sqrt = _trace_sqrt_scipy(cov1, cov2) if method == "scipy" else _trace_sqrt_eigh(cov1, cov2)
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    # FD >= 0 exactly; clip round-off below 0 (a large negative value would be a bug and is left visible)
    tiny = 1e-9 * max(1.0, float(np.trace(cov1) + np.trace(cov2)))
    return 0.0 if -tiny < fd < 0.0 else fd


def frechet_distance_features(features1, features2, method: str = "auto") -> float:
    """Fréchet distance between the Gaussian fits of two feature sets shaped ``(n1, d)`` and ``(n2, d)``."""
    f1, f2 = _as_float64(features1, "features1"), _as_float64(features2, "features2")
    if f1.ndim != 2 or f2.ndim != 2:
        raise ValueError(f"features must be shaped (n, d), got shapes {f1.shape} and {f2.shape}")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} and {f2.shape[1]}")
    return frechet_distance(*gaussian_fit(f1), *gaussian_fit(f2), method=method)
