"""Assertions shared by the vq test files (every backend is held to the same checks)."""
import torch

from musefast.reference.vq import vq_nearest_l2


def true_distances(z2: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Exact (float64) squared distance from each row of z2 to its chosen code."""
    return (z2.double() - codebook.double()[indices]).pow(2).sum(-1)


def assert_nearest(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, distances=None) -> None:
    """The chosen code is a true nearest one (ties legal) and the returned distance is right.

    Tolerance: the fast backends rank by ||c||^2 - 2 z.c in float32, whose rounding error is
    about eps32 * (||z||^2 + ||c||^2) * few; a choice within that of the true minimum is a
    legal near-tie, anything further is a wrong answer.
    """
    z2 = z.reshape(-1, z.shape[-1])
    idx = indices.reshape(-1)
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0]
    _, best = vq_nearest_l2(z2, codebook)
    chosen = true_distances(z2, codebook, idx)
    scale = z2.double().pow(2).sum(-1) + codebook.double().pow(2).sum(-1).max()
    tol = 8 * 2.0**-23 * scale + 1e-6
    gap = chosen - best.double()
    assert bool((gap <= tol).all()), f"max excess distance {gap.max().item():.3e} > tol"
    if distances is not None:
        d = distances.reshape(-1).double()
        assert distances.dtype == torch.float32
        assert bool(((d - chosen).abs() <= tol + 1e-5 * chosen).all()), "returned distance is off"
