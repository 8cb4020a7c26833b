"""Numerical kernels for data-driven structured pruning.

* :class:`TSQR` / :func:`tsqr_r`: the ``R`` factor of a tall matrix given block by block
  (QR each block, stack the ``R`` factors, QR again), in ``O(C^2)`` memory;
* :func:`pivoted_qr`: column-pivoted QR of a small matrix (scipy, float64);
* :func:`interpolative_decomposition`: ``Z ~= Z[:, S] @ T`` from a pivoted QR;
* :func:`interpolation_matrix`: the least-squares ``T`` for given kept columns;
* :func:`id_error`: the error proxy ``|R[k, k] / R[0, 0]|`` of keeping ``k`` pivots.

Everything here takes and returns torch tensors; the small dense factorizations run in
float64 on the CPU.

>>> acc = TSQR()
>>> for block in blocks:               # rows = samples x positions, columns = channels
...     acc.update(block)
>>> S, T = interpolative_decomposition(acc.r(), k=12)
>>> # Z ~= Z[:, S] @ T for the stacked blocks Z
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "TSQR",
    "IDResult",
    "id_error",
    "id_from_pivoted",
    "interpolation_matrix",
    "interpolative_decomposition",
    "pivoted_qr",
    "qr_r",
    "tsqr_r",
]


def _positive_diagonal(r: torch.Tensor) -> torch.Tensor:
    """Flip row signs so that the diagonal of an upper-triangular ``r`` is non-negative."""
    n = min(r.shape)
    if n == 0:
        return r
    d = torch.sign(torch.diagonal(r)[:n])
    d = torch.where(d == 0, torch.ones_like(d), d)
    out = r.clone()
    out[:n] *= d.unsqueeze(1)
    return out


def qr_r(a: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """The ``R`` factor (``min(m, C) x C``, upper triangular) of a matrix ``a`` (``m x C``).

    Very tall, narrow matrices are split into row chunks that are factored together by a
    batched QR (LAPACK is slow on one ``m x 16`` matrix and fast on many short ones); the
    stacked chunk factors are factored again. The result is the same up to row signs.
    """
    m, c = a.shape
    if m == 0:
        return a.new_zeros(0, c)
    if chunk_rows is None:
        chunk_rows = max(256, 32 * c)
    if m >= 4 * chunk_rows and c > 0:
        nb = m // chunk_rows
        head = a[: nb * chunk_rows].reshape(nb, chunk_rows, c)
        rs = torch.linalg.qr(head, mode="r")[1].reshape(nb * c, c)
        tail = a[nb * chunk_rows :]
        a = torch.cat([rs, tail]) if len(tail) else rs
        if a.shape[0] >= 4 * chunk_rows:
            return qr_r(a, chunk_rows=chunk_rows)
    return torch.linalg.qr(a, mode="r")[1]


class TSQR:
    """Streaming tall-skinny QR: the ``R`` factor of ``[Z_1; Z_2; ...]`` fed one block at a time.

    Each block is reduced to its ``R`` factor in its own dtype (float32 activations stay
    float32, so the block QR is fast); the running factor is kept in ``dtype`` (float64)
    and merged with each new block factor by a QR of the two stacked factors. Memory is
    ``O(C^2)`` whatever the number of rows.

    Args:
        dtype: dtype of the accumulated factor.
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self._r: torch.Tensor | None = None
        self.rows = 0

    @property
    def ncols(self) -> int | None:
        return None if self._r is None else self._r.shape[1]

    def update(self, block: torch.Tensor) -> TSQR:
        """Add rows ``block`` (``m x C``; any float dtype / device)."""
        if block.dim() != 2:
            raise ValueError(f"TSQR blocks must be 2-D (rows x columns), got shape {tuple(block.shape)}")
        if self._r is not None and block.shape[1] != self._r.shape[1]:
            raise ValueError(f"block has {block.shape[1]} columns, earlier blocks had {self._r.shape[1]}")
        if block.shape[0] == 0:
            if self._r is None:
                self._r = torch.zeros(0, block.shape[1], dtype=self.dtype)
            return self
        if not block.is_floating_point():
            block = block.to(self.dtype)
        elif block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        rb = qr_r(block.detach()).to(device="cpu", dtype=self.dtype)
        self.rows += block.shape[0]
        self._r = rb if self._r is None or self._r.shape[0] == 0 else torch.linalg.qr(
            torch.cat([self._r, rb]), mode="r")[1]
        return self

    def merge(self, other: TSQR) -> TSQR:
        """Add all rows of another accumulator (same number of columns)."""
        if other._r is not None:
            self.update(other._r)
            self.rows += other.rows - other._r.shape[0]
        return self

    def r(self) -> torch.Tensor:
        """The accumulated factor, ``C x C`` upper triangular with a non-negative diagonal.

        With fewer rows than columns the missing rows are zero.
        """
        if self._r is None:
            raise ValueError("TSQR has seen no block")
        r = _positive_diagonal(self._r)
        c = r.shape[1]
        if r.shape[0] < c:
            r = torch.cat([r, r.new_zeros(c - r.shape[0], c)])
        return r


def tsqr_r(blocks: Iterable[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``R`` factor (``C x C``, non-negative diagonal) of the row-wise concatenation of ``blocks``."""
    acc = TSQR(dtype)
    for b in blocks:
        acc.update(b)
    return acc.r()


def pivoted_qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-pivoted QR ``a[:, perm] = Q R``; returns ``(R, perm)``.

    ``R`` is ``min(m, C) x C`` float64 with ``|R[0, 0]| >= |R[1, 1]| >= ...``; ``perm`` is a
    LongTensor. Computed by LAPACK ``geqp3`` through ``scipy.linalg.qr``.
    """
    import scipy.linalg

    arr = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        return torch.zeros(0, arr.shape[1], dtype=torch.float64), torch.arange(arr.shape[1])
    r, perm = scipy.linalg.qr(arr, mode="r", pivoting=True, check_finite=True)
    return torch.from_numpy(np.ascontiguousarray(r)), torch.from_numpy(perm.astype(np.int64))


def id_error(r_pivoted: torch.Tensor, k: int) -> float:
    """Error proxy of keeping the first ``k`` pivots: ``|R[k, k] / R[0, 0]|`` (0 when ``k`` keeps all)."""
    n = min(r_pivoted.shape)
    if k >= n:
        return 0.0
    r00 = float(abs(r_pivoted[0, 0]))
    if r00 == 0.0:
        return 0.0
    return float(abs(r_pivoted[k, k])) / r00


def _rank(r_pivoted: torch.Tensor, k: int, rtol: float | None) -> int:
    """Numerical rank of the leading ``k x k`` block of a pivoted ``R`` (diagonal is non-increasing)."""
    d = torch.diagonal(r_pivoted).abs()[:k]
    if len(d) == 0 or float(d[0]) == 0.0:
        return 0
    if rtol is None:
        rtol = max(r_pivoted.shape) * float(torch.finfo(torch.float64).eps)
    return int((d > rtol * d[0]).sum())


@dataclass
class IDResult:
    """An interpolative decomposition ``Z ~= Z[:, keep] @ T``.

    keep
        kept column indices, sorted ascending (LongTensor, ``k``).
    T
        interpolation matrix, ``k x C`` float64; ``T[:, keep]`` is the identity.
    error
        the proxy ``|R[k, k] / R[0, 0]|`` of the pivoted QR.
    r
        the pivoted ``R`` factor; ``perm`` its column permutation.
    """

    keep: torch.Tensor
    T: torch.Tensor
    error: float
    r: torch.Tensor
    perm: torch.Tensor


def interpolative_decomposition(
    a: torch.Tensor, k: int, *, rtol: float | None = None, return_info: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | IDResult:
    """Column interpolative decomposition of ``a`` (a data matrix ``Z`` or its ``R`` factor).

    Column-pivoted QR ``a P = Q R``; the first ``k`` pivots are the kept columns ``S`` and
    ``T = [I_k | R11^-1 R12] P^T``, so that ``Z ~= Z[:, S] @ T``; ``T`` solves the least
    squares problem ``min ||Z[:, S] T - Z||`` exactly. ``a`` may be ``Z`` itself or any factor
    with the same Gram matrix (``R`` from :class:`TSQR`): the decomposition is the same.

    Rank deficiency: pivots whose diagonal is below ``rtol * |R[0, 0]|`` are kept columns
    that explain nothing more; the non-kept columns are then expressed through the
    numerically independent pivots only (no division by a vanishing diagonal).

    Returns ``(S, T)`` with ``S`` sorted ascending (``T``'s rows follow ``S``), or an
    :class:`IDResult` when ``return_info``.
    """
    c = a.shape[1]
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    if a.shape[0] > 2 * c:  # reduce a tall data matrix first; the pivoted QR only needs R
        a = qr_r(a.to(torch.float64))
    r, perm = pivoted_qr(a)
    res = id_from_pivoted(r, perm, k, rtol=rtol)
    return res if return_info else (res.keep, res.T)


def id_from_pivoted(r: torch.Tensor, perm: torch.Tensor, k: int, *, rtol: float | None = None) -> IDResult:
    """The rank-``k`` interpolative decomposition from a computed pivoted QR ``(r, perm)``
    (see :func:`interpolative_decomposition`)."""
    c = r.shape[1]
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    r = r.to(torch.float64)
    if r.shape[0] < c:
        r = torch.cat([r, r.new_zeros(c - r.shape[0], c)])
    rank = _rank(r, k, rtol)
    x = torch.zeros(k, c - k, dtype=torch.float64)
    if rank > 0 and k < c:
        import scipy.linalg

        x[:rank] = torch.from_numpy(scipy.linalg.solve_triangular(
            r[:rank, :rank].numpy(), r[:rank, k:].numpy(), lower=False, check_finite=False))
    t_piv = torch.cat([torch.eye(k, dtype=torch.float64), x], 1)  # columns in pivot order
    t = torch.empty(k, c, dtype=torch.float64)
    t[:, perm] = t_piv
    order = torch.argsort(perm[:k])
    return IDResult(keep=perm[:k][order], T=t[order], error=id_error(r, k), r=r, perm=perm)


def interpolation_matrix(r: torch.Tensor, keep: torch.Tensor, *, rcond: float | None = None) -> torch.Tensor:
    """Least-squares interpolation ``T = argmin ||Z[:, keep] T - Z||_F`` from an ``R`` factor of ``Z``.

    ``r`` is any factor with ``r^T r = Z^T Z`` (e.g. from :class:`TSQR`); the rows of ``T``
    follow ``keep``. Rank-deficient kept columns get the minimum-norm solution.
    """
    r64 = r.detach().to(device="cpu", dtype=torch.float64)
    a = r64[:, keep]
    if rcond is None:
        rcond = max(r64.shape) * float(torch.finfo(torch.float64).eps)
    sol = torch.linalg.lstsq(a, r64, rcond=rcond, driver="gelsd").solution
    t = sol[: len(keep)]
    # kept columns reproduce themselves exactly
    t[:, keep] = torch.eye(len(keep), dtype=torch.float64)
    return t
