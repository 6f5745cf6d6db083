"""Stage 3: TextSpan (Gandelsman et al.) computed from sufficient statistics alone (docs/METHOD.md §1.2).

With C the head's contributions (N x D): the right singular vectors of C are eigenvectors of C^T C (the
uncentred outer sum), the std of a projection C r over images is sqrt(r^T Cov r / N), and removing the
direction u of a chosen text maps Cov -> P Cov P with P = I - u u^T."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from surgeon.core.errors import InvalidInput
from surgeon.core.progress import progress_bar
from surgeon.core.stats import HeadStats


@dataclass(frozen=True)
class SpanResult:
    picks: tuple[int, ...]  # indices into the text pool, in TextSpan order
    stds: tuple[float, ...]  # std over images of the projection on each pick, when it was picked
    effective_rank: int  # the projection rank used: min(requested, the head's numerical rank)


def numerical_rank(eigenvalues: torch.Tensor, count: int) -> int:
    """How many directions of a head's statistics carry signal rather than float32 rounding.

    The eigenvalues of the outer sum C^T C are the squared singular values of the head's contributions C
    (N x D), which are computed in float32: C = C_exact + E with |E| about eps32 * |C| per entry, so C's
    singular values below ~sqrt(D) * eps32 * sigma_max (rounding of D-term float32 products, Higham's
    probabilistic bound) are rounding, and their directions change with the batch size, shard layout, image
    order or device. Keeping such a direction in the TextSpan basis lets the pool's components along it steer
    the removal step, so picks 2..m follow rounding. Measured (NOTES.md): on the bundled model (D = 128) every
    head has 15 singular values at >= 8e-6 of the largest and the rest at <= 3e-8 (threshold 1.3e-6); a
    random-init ViT-B-32 shows the same cliff. At most `count`: N images span at most N directions."""
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if top <= 0.0:
        return 0
    rtol = eigenvalues.shape[0] ** 0.5 * torch.finfo(torch.float32).eps
    return min(int((eigenvalues > rtol**2 * top).sum()), count)


_THREADS_LOCK = threading.Lock()  # the thread count is process-wide: the server ranks in several threads


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-threaded on CPU: multi-threaded LAPACK eigh at these sizes is 10-100x slower when cores are
    busy (measured 0.02 s vs 0.2-1.7 s for 384 x 384 on 2 loaded cores)."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    with _THREADS_LOCK:  # two overlapping save/restore pairs would leave the process on one thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.linalg.eigh(matrix)
        finally:
            torch.set_num_threads(threads)


def textspan(
    count: int, total: torch.Tensor, outer: torch.Tensor, texts: torch.Tensor, m: int, span_rank: int
) -> SpanResult:
    """Greedy TextSpan for one head: `total` (D,), `outer` (D, D), `texts` (M, D) L2-normalised."""
    if m <= 0:
        raise InvalidInput(f"m must be positive, got {m}")
    if span_rank <= 0:
        raise InvalidInput(f"span_rank must be positive, got {span_rank}")
    outer = outer.double()
    values, vectors = _eigh(outer)  # ascending eigenvalues
    effective = min(span_rank, numerical_rank(values, count))
    if effective == 0:  # a head that never writes anything: nothing to explain
        return SpanResult((), (), 0)
    basis = vectors[:, -effective:]
    pool = texts.to(outer.device, torch.float64) @ basis @ basis.T  # texts projected onto the head's span
    mean = total.double() / count
    cov = outer - count * torch.outer(mean, mean)
    taken = torch.zeros(pool.shape[0], dtype=torch.bool, device=pool.device)
    picks, stds = [], []
    for _ in range(min(m, pool.shape[0])):
        score = ((pool @ cov) * pool).sum(1).clamp_min(0)
        score[taken] = -1.0
        best = int(score.argmax())
        text = pool[best]
        norm2 = float(text @ text)
        if norm2 <= 1e-24:
            break
        picks.append(best)
        stds.append(float(score[best] / count) ** 0.5)
        taken[best] = True
        u = text / norm2**0.5
        cov_u = cov @ u
        cov = cov - torch.outer(u, cov_u) - torch.outer(cov_u, u) + float(u @ cov_u) * torch.outer(u, u)
        pool = pool - torch.outer(pool @ text / norm2, text)
    return SpanResult(tuple(picks), tuple(stds), effective)


def textspan_all(
    stats: HeadStats, texts: torch.Tensor, m: int, span_rank: int, quiet: bool = True
) -> list[list[SpanResult]]:
    """TextSpan for every head of every analysed layer: result[layer_index][head] (a bar per head unless quiet)."""
    if stats.count < 2:
        raise InvalidInput(f"TextSpan needs at least 2 images, got {stats.count}")
    with progress_bar("TextSpan", len(stats.layers) * stats.n_heads, quiet) as advance:

        def one(li: int, h: int) -> SpanResult:
            span = textspan(stats.count, stats.total[li, h], stats.outer[li, h], texts, m, span_rank)
            advance(1)
            return span

        return [[one(li, h) for h in range(stats.n_heads)] for li in range(len(stats.layers))]
