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

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    "release_workspace",
    "small_ops",
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


def qr_r(a: torch.Tensor) -> torch.Tensor:
    """The ``R`` factor (``min(m, C) x C``, upper triangular) of a matrix ``a`` (``m x C``)."""
    if a.shape[0] == 0:
        return a.new_zeros(0, a.shape[1])
    return torch.linalg.qr(a, mode="r")[1]


@contextmanager
def small_ops(size: int = 0, limit: int = 512) -> Iterator[None]:
    """Run small dense factorizations (``size <= limit`` columns) on one thread.

    For a 64 x 64 QR, waking the thread pool costs more than the work -- ten times more on a
    machine whose cores are busy -- so the many small factorizations of a pruning step run
    single-threaded.
    """
    if size > limit or torch.get_num_threads() == 1:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_WORKSPACE: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused scratch tensor: converting every block into a fresh float64 buffer costs page faults
    that dominate the Gram products of narrow activations."""
    # a buffer made under torch.inference_mode() cannot be written outside it (and the reverse is fine but
    # would keep the other kind out): one buffer per mode
    key = (name, dtype, str(device), torch.is_inference_mode_enabled())
    n = 1
    for s in shape:
        n *= int(s)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free the scratch buffers of :class:`TSQR` (they are kept between blocks for speed)."""
    _WORKSPACE.clear()


def _gram_r(g: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``R`` with ``R^T R = G + delta I`` for a (float64, PSD) Gram matrix ``G``.

    ``delta = C * eps * max(diag G)`` is the smallest shift that lets Cholesky through for a
    singular ``G`` (dead channels); it perturbs ``R`` by ``sqrt(delta) ~ 1e-7 * |largest column|``,
    below the precision of float32 activations. If Cholesky still fails, an eigendecomposition
    gives the factor.
    """
    c = g.shape[0]
    top = float(torch.diagonal(g).max()) if c else 0.0
    if top <= 0.0:
        return torch.zeros_like(g)
    delta = c * float(torch.finfo(torch.float64).eps) * top
    eye = torch.eye(c, dtype=g.dtype, device=g.device)
    l, info = torch.linalg.cholesky_ex(0.5 * (g + g.T) + delta * eye)
    if int(info) == 0:
        return l.T.contiguous()
    evals, evecs = torch.linalg.eigh(0.5 * (g + g.T))
    half = evals.clamp_min(0).sqrt().unsqueeze(1) * evecs.T
    return _positive_diagonal(qr_r(half))


class TSQR:
    """Streaming tall-skinny QR: the ``R`` factor of ``[Z_1; Z_2; ...]`` fed one block at a time.

    Memory is ``O(C^2)`` whatever the number of rows. Two ways to reduce a block:

    * ``block="qr"`` (the classic TSQR): Householder QR of each block in its own dtype, the
      running factor (float64) and the block factor stacked and factored again;
    * ``block="gram"`` (CholeskyQR leaves): each block's float64 Gram matrix ``Z_b^T Z_b`` is added
      to a running sum and ``R`` is its (shifted) Cholesky factor. For blocks of many rows and few
      columns (activations: samples x positions by channels) this is several times faster --
      one matrix product instead of a level-2-bound QR -- and, computed in float64 from float32
      data, as accurate as a float32 Householder QR: the relative error of ``R[k, k] / R[0, 0]``
      stays below ``1e-6`` for ratios down to about ``3e-4`` (``~1e-4`` relative at ``1e-5``).

    Both give the same ``R`` up to rounding (and row signs, normalised by :meth:`r`).

    Args:
        dtype: dtype of the accumulated factor.
        block: ``"qr"`` or ``"gram"``.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, block: str = "qr"):
        if block not in ("qr", "gram"):
            raise ValueError(f"block must be 'qr' or 'gram', got {block!r}")
        self.dtype = dtype
        self.block = block
        self._r: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self._c: int | None = None
        self.rows = 0

    @property
    def ncols(self) -> int | None:
        return self._c

    def update(self, block: torch.Tensor) -> TSQR:
        """Add rows ``block`` (``m x C``; any float dtype / device)."""
        if block.dim() != 2:
            raise ValueError(f"TSQR blocks must be 2-D (rows x columns), got shape {tuple(block.shape)}")
        if self._c is not None and block.shape[1] != self._c:
            raise ValueError(f"block has {block.shape[1]} columns, earlier blocks had {self._c}")
        self._c = int(block.shape[1])
        block = block.detach()
        if block.shape[0] == 0:
            return self
        self.rows += int(block.shape[0])
        if self.block == "gram":
            z = _workspace("z", tuple(block.shape), self.dtype, block.device)
            z.copy_(block)
            g = (z.T @ z).cpu()
            self._g = g if self._g is None else self._g + g
            return self
        if not block.is_floating_point() or block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        rb = qr_r(block).to(device="cpu", dtype=self.dtype)
        self._r = rb if self._r is None else qr_r(torch.cat([self._r, rb]))
        return self

    def update_channels(self, x: torch.Tensor, dim: int = 1) -> TSQR:
        """Add an activation tensor whose axis ``dim`` holds the columns (channels); every other
        position is a row. For ``dim=1`` (``N x C x ...``) the Gram matrix is formed without moving
        the channels last."""
        dim = dim % x.dim()
        positions = x.numel() // max(1, x.shape[0] * x.shape[dim]) if x.dim() >= 3 else 1
        c = x.shape[dim]
        # per-example products skip the channels-last copy; worth it when each example has many positions
        if self.block == "gram" and dim == 1 and x.dim() >= 3 and positions >= c and x.shape[0] * c * c <= 2**23:
            if self._c is not None and c != self._c:
                raise ValueError(f"block has {c} columns, earlier blocks had {self._c}")
            self._c = int(c)
            n = x.shape[0]
            xd = _workspace("x", (n, c, positions), self.dtype, x.device)
            xd.copy_(x.detach().reshape(n, c, positions))
            prods = _workspace("g", (n, c, c), self.dtype, x.device)
            torch.matmul(xd, xd.transpose(1, 2), out=prods)
            g = prods.sum(0).cpu()
            self._g = g if self._g is None else self._g + g
            self.rows += int(n * positions)
            return self
        z = x.movedim(dim, -1)
        return self.update(z.reshape(-1, z.shape[-1]))

    def merge(self, other: TSQR) -> TSQR:
        """Add all rows of another accumulator (same number of columns)."""
        if other._c is None:
            return self
        rows = self.rows
        self.update(other.r())
        self.rows = rows + other.rows
        return self

    def all_reduce_(self) -> TSQR:
        """Under torchrun: combine every rank's rows into this accumulator (in place, on every rank).

        ``"gram"``: the Gram matrices are summed; ``"qr"``: the ranks' ``R`` factors are gathered, stacked
        and factored once more (TSQR's reduction tree with one level). Afterwards :meth:`r` is the
        factor of all ranks' rows, equal on every rank (up to rounding; row signs normalised).
        """
        from prunekit import distributed

        if not distributed.active():
            return self
        import torch.distributed as dist

        cols = distributed.all_reduce_sum([float(self._c or 0)])[0] / distributed.world_size()
        if self._c is None or cols != self._c:
            raise ValueError("TSQR.all_reduce_: every rank must have seen blocks with the same number of columns")
        self.rows = int(distributed.all_reduce_sum([float(self.rows)])[0])
        if self.block == "gram":
            g = self._g if self._g is not None else torch.zeros(self._c, self._c, dtype=self.dtype)
            g = g.to(torch.float64).contiguous()
            dist.all_reduce(g)
            self._g = g.to(self.dtype)
            return self
        r = self.r().to(torch.float64).contiguous()
        parts = [torch.empty_like(r) for _ in range(distributed.world_size())]
        dist.all_gather(parts, r)
        self._r = qr_r(torch.cat(parts)).to(self.dtype)
        return self

    def r(self) -> torch.Tensor:
        """The accumulated factor, ``C x C`` upper triangular with a non-negative diagonal.

        With fewer rows than columns the missing rows are zero.
        """
        if self._c is None:
            raise ValueError("TSQR has seen no block")
        c = self._c
        if self.block == "gram":
            return _gram_r(self._g) if self._g is not None else torch.zeros(c, c, dtype=self.dtype)
        if self._r is None:
            return torch.zeros(c, c, dtype=self.dtype)
        r = _positive_diagonal(self._r)
        if r.shape[0] < c:
            r = torch.cat([r, r.new_zeros(c - r.shape[0], c)])
        return r


def tsqr_r(blocks: Iterable[torch.Tensor], dtype: torch.dtype = torch.float64, block: str = "qr") -> torch.Tensor:
    """``R`` factor (``C x C``, non-negative diagonal) of the row-wise concatenation of ``blocks``."""
    acc = TSQR(dtype, block)
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
