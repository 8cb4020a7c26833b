"""Exact dynamic mode decomposition (DMD) of parameter trajectories, in bounded memory.

For snapshots ``w_0 .. w_{T-1}`` (columns of ``W``, ``N x T``) let ``X = W[:, :-1]`` and ``Y = W[:, 1:]``.
Exact DMD (METHODS.md §6) takes the thin SVD ``X = U S V^T`` truncated at ``s_i > rtol * s_max`` (the Koopman
seed kept every singular value and inverted tiny ones), ``A~ = U^T Y V S^-1``, its eigenpairs
``A~ q = lambda q`` and the modes ``phi = Y V S^-1 q / lambda``.

Everything DMD needs from ``W`` is in the ``T x T`` Gram matrix ``G = W^T W`` (method of snapshots):
``X^T X = G[:-1, :-1] = V S^2 V^T``, ``X^T Y = G[:-1, 1:]``, so ``A~ = S^-1 V^T (X^T Y) V S^-1``, and every
mode is ``Y c`` for a coefficient vector ``c = V S^-1 q / lambda`` of length ``T - 1``. So:

1. one pass over the recorded file in column blocks accumulates ``G`` (float64),
2. the small problem is solved in ``T``-space,
3. a second pass forms only the wanted ``N``-vectors ``Y c``.

Memory is ``O(T^2 + block)``, never ``N x T``. :func:`dmd_dense` is the textbook computation on an
in-memory matrix (the reference of the tests). The Gram route squares the condition number, so singular
values below ~``1e-6 s_max`` drown in rounding (of the sums in ``G`` and of ``eigh``): the Gram route never
keeps them (``rtol`` below ``1e-6`` acts as ``1e-6``, the default).

* :func:`kmp_mode` -- the mode of the eigenvalue nearest 1 (the point training converges to);
* :func:`kgp_change` -- the predicted next change ``sum_i phi_i (lambda_i - 1) b_i`` over all modes, with
  ``b`` the amplitudes of the last snapshot (``Phi b ~= w_{T-1}``, least squares), computed with one
  eigendecomposition and matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError

__all__ = ["DMD", "dmd_dense", "dmd_gram", "gram", "kgp_change", "kmp_mode", "modes_dense"]

DEFAULT_RTOL = 1e-6
GRAM_FLOOR = 1e-6  # the Gram route cannot resolve singular values below ~1e-6 s_max (rounding in G and eigh)


@dataclass
class DMD:
    """The solved small problem: eigenvalues and mode coefficients (modes = ``Y @ coeffs``)."""

    eigenvalues: np.ndarray  # (r,) complex
    coeffs: np.ndarray  # (T-1, r) complex
    singular_values: np.ndarray  # kept singular values of X
    rank: int
    amplitudes: np.ndarray | None = None  # (r,) complex: Phi b ~= last snapshot

    def nearest_one(self) -> int:
        return int(np.argmin(np.abs(self.eigenvalues - 1.0)))


def _check_snapshots(t: int) -> None:
    if t < 3:
        raise PrunekitError(f"DMD needs at least 3 snapshots, the trajectory has {t}")


def gram(traj: Any, max_bytes: int = 4 << 20) -> np.ndarray:
    """``W^T W`` (float64, ``T x T``) of a :class:`~prunekit.train.trajectory.Trajectory`, one block pass."""
    g = np.zeros((traj.t, traj.t), dtype=np.float64)
    for _, _, block in traj.blocks(max_bytes):
        b = block.astype(np.float64)
        g += b @ b.T
    return g


def _solve(xtx: np.ndarray, xty: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eigenpairs of ``A~`` from ``X^T X`` and ``X^T Y``: returns ``lambda``, ``V S^-1 q``, ``s``, ``V``."""
    ev, v = np.linalg.eigh(xtx)
    order = np.argsort(ev)[::-1]
    ev, v = np.clip(ev[order], 0.0, None), v[:, order]
    s = np.sqrt(ev)
    if not s.size or s[0] <= 0:
        raise PrunekitError("DMD: the snapshots are all zero")
    keep = s > max(rtol, GRAM_FLOOR) * s[0]
    s, v = s[keep], v[:, keep]
    vs = v / s  # V S^-1
    a = vs.T @ xty @ vs
    lam, q = np.linalg.eig(a)
    return lam, vs @ q, s, v


def dmd_gram(g: np.ndarray, rtol: float = DEFAULT_RTOL) -> DMD:
    """Exact DMD from the snapshot Gram matrix ``G = W^T W`` (modes = ``W[:, 1:] @ coeffs``)."""
    t = g.shape[0]
    _check_snapshots(t)
    lam, vsq, s, _ = _solve(g[:-1, :-1], g[:-1, 1:], rtol)
    safe = np.where(np.abs(lam) > 1e-300, lam, 1e-300)
    coeffs = vsq / safe
    # amplitudes of the last snapshot: least squares Phi b = y_last in T-space (Phi^H Phi = C^H G_yy C)
    gyy = g[1:, 1:]
    lhs = coeffs.conj().T @ gyy @ coeffs
    rhs = coeffs.conj().T @ g[1:, -1]
    b = np.linalg.lstsq(lhs, rhs, rcond=1e-12)[0]
    return DMD(lam, coeffs, s, int(s.size), b)


def dmd_dense(w: np.ndarray, rtol: float = DEFAULT_RTOL) -> tuple[DMD, np.ndarray]:
    """Textbook exact DMD of an in-memory ``N x T`` matrix (float64 SVD); returns the solution and all modes."""
    w = np.asarray(w, dtype=np.float64)
    _check_snapshots(w.shape[1])
    x, y = w[:, :-1], w[:, 1:]
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > rtol * s[0]
    u, s, v = u[:, keep], s[keep], vt[keep].T
    a = u.T @ y @ v / s
    lam, q = np.linalg.eig(a)
    coeffs = (v / s) @ q / lam
    phi = y @ coeffs
    b = np.linalg.lstsq(phi, y[:, -1], rcond=None)[0]
    return DMD(lam, coeffs, s, int(s.size), b), phi


def modes_dense(w: np.ndarray, sol: DMD) -> np.ndarray:
    """All modes ``W[:, 1:] @ coeffs`` of an in-memory matrix."""
    return np.asarray(w, dtype=np.float64)[:, 1:] @ sol.coeffs


def _combine(traj: Any, coeff: np.ndarray, max_bytes: int = 4 << 20) -> np.ndarray:
    """``Y @ coeff`` (``N`` complex128) for one coefficient vector of length ``T - 1``, streamed by blocks."""
    out = np.empty(traj.n, dtype=np.complex128)
    for a, b, block in traj.blocks(max_bytes):
        y = block[1:].astype(np.float64)
        out[a:b] = y.T @ coeff.real + 1j * (y.T @ coeff.imag)
    return out


def solve(traj: Any, rtol: float = DEFAULT_RTOL) -> DMD:
    """The DMD of a recorded trajectory (cached on it per ``rtol``)."""
    key = ("dmd", float(rtol))
    cache = getattr(traj, "_cache", None)
    if cache is not None and key in cache:
        return cache[key]
    sol = dmd_gram(gram(traj), rtol)
    if cache is not None:
        cache[key] = sol
    return sol


def kmp_mode(traj: Any, rtol: float = DEFAULT_RTOL) -> tuple[np.ndarray, complex]:
    """The Koopman mode of the eigenvalue nearest 1 (``N`` complex) and that eigenvalue."""
    sol = solve(traj, rtol)
    j = sol.nearest_one()
    return _combine(traj, sol.coeffs[:, j]), complex(sol.eigenvalues[j])


def kgp_change(traj: Any, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """The Koopman-predicted change of every parameter over the next step, ``Phi (Lambda - I) b`` (``N`` complex)."""
    sol = solve(traj, rtol)
    assert sol.amplitudes is not None
    d = sol.coeffs @ ((sol.eigenvalues - 1.0) * sol.amplitudes)
    return _combine(traj, d)
