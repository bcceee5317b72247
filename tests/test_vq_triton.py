"""Triton backend of vq_nearest (musefast.kernels.vq) against the float64 reference.

Runs on a GPU when there is one, else in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest), which has no bfloat16: bf16 is covered by tests/test_vq_gpu.py. The interpreter
costs Python time per block operation per program, so the largest combination (N=1025 rows
against K=8192 codes: 9 row blocks × 32 code tiles) is left to the GPU suite; the K=8192 sweep
is covered here with N ∈ {1, 97} and the many-row-block case with K ∈ {1, 1000}.
"""
import itertools

import pytest
import torch

from musefast import ops
from musefast.ops import _availability as avail
from musefast.reference.vq import vq_nearest_l2
from vq_checks import assert_nearest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASONS = avail.triton_reasons(torch.empty(1, device=DEVICE))
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "triton usable")
INTERPRET = avail.interpret_mode()

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _triton(z, codebook):
    from musefast.kernels.vq import vq_nearest_triton

    return vq_nearest_triton(z, codebook)


def check_vq(z, codebook, indices, distances, *, max_mismatch=0.01):
    """The shared nearest/distance checks (tests/vq_checks.py), plus a count of indices that
    differ from the reference's: legal only at floating-point near-ties, so they must be rare."""
    assert indices.shape == (z.shape[0],) and distances.shape == (z.shape[0],)
    assert_nearest(z, codebook, indices, distances)
    ref_idx, _ = vq_nearest_l2(z, codebook)
    mismatches = int((indices != ref_idx).sum())
    assert mismatches <= max_mismatch * z.shape[0], f"{mismatches}/{z.shape[0]} indices differ from the reference"


SHAPES = [
    (N, D, K)
    for N, D, K in itertools.product((1, 97, 1025), (8, 59, 64, 256), (1, 1000, 8192))
    if not (INTERPRET and N == 1025 and K == 8192)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", SHAPES)
def test_matches_reference(N, D, K, dtype):
    z = torch.randn(N, D, device=DEVICE).to(dtype)
    codebook = torch.randn(K, D, device=DEVICE).to(dtype)
    indices, distances = _triton(z, codebook)
    check_vq(z, codebook, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,K", [(8, 1000), (59, 300), (256, 513)])
def test_self_match(D, K, dtype):
    """z = codebook rows (shuffled) must return their own index, at distance ~0."""
    codebook = torch.randn(K, D, device=DEVICE).to(dtype)
    perm = torch.randperm(K, device=DEVICE)
    indices, distances = _triton(codebook[perm], codebook)
    assert torch.equal(indices, perm)
    assert_nearest(codebook[perm], codebook, indices, distances)  # distances ~0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(97, 59, 1000), (200, 16, 300), (33, 8, 1)])
def test_exact_ties_go_to_lowest_index(N, D, K, dtype):
    """Small integers make every product, norm and score exact in fp32, so equal distances
    are exactly equal: the result must be the reference's first minimum, bit for bit."""
    codebook = torch.randint(-3, 4, (K, D), device=DEVICE).to(dtype)
    if K > 1:
        codebook[K - 1] = codebook[0]  # duplicates in different code tiles
        codebook[K // 2 + 1] = codebook[K // 2]  # and adjacent ones
    z = torch.randint(-3, 4, (N, D), device=DEVICE).to(dtype)
    if K > 1:
        z[:4] = codebook[[0, K - 1, K // 2, K // 2 + 1]]
    indices, distances = _triton(z, codebook)
    ref_idx, ref_dist = vq_nearest_l2(z.cpu(), codebook.cpu())
    assert torch.equal(indices.cpu(), ref_idx)
    assert torch.equal(distances.cpu(), ref_dist)
    if K > 1:
        assert indices[:4].tolist() == [0, 0, K // 2, K // 2]


@pytest.mark.skipif(not INTERPRET, reason="the fixed interpreter config is only used under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_many_small_tiles(monkeypatch, dtype):
    """The smallest legal blocks (16 rows × 16 codes, 16-wide dot) over a shape that needs
    several row blocks, code tiles and D chunks, with masked tails in all three."""
    import musefast.kernels.vq as kvq

    monkeypatch.setitem(kvq._FIXED, "BLOCK_N", 16)
    monkeypatch.setitem(kvq._FIXED, "BLOCK_K", 16)
    monkeypatch.setitem(kvq._MAX_BLOCK_D, dtype, 16)
    N, D, K = 50, 37, 70
    codebook = torch.randint(-3, 4, (K, D)).to(dtype)
    codebook[69] = codebook[2]
    z = torch.randint(-3, 4, (N, D)).to(dtype)
    z[0] = codebook[2]
    indices, distances = _triton(z, codebook)
    ref_idx, ref_dist = vq_nearest_l2(z, codebook)
    assert torch.equal(indices, ref_idx) and torch.equal(distances, ref_dist)
    assert int(indices[0]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs(dtype):
    N, D, K = 97, 59, 300
    big_z = torch.randn(2 * N, 3 * D, device=DEVICE).to(dtype)
    big_cb = torch.randn(D, 2 * K, device=DEVICE).to(dtype)
    z_strided = big_z[::2, 5 : 5 + D]  # row stride 6D, unit D stride
    z_transposed = big_z[:D, :N].t()  # D stride != 1
    codebook = big_cb[:, ::2].t()  # (K, D) with strides (2, 2K)
    assert not z_strided.is_contiguous() and not z_transposed.is_contiguous() and not codebook.is_contiguous()
    for z in (z_strided, z_transposed):
        indices, distances = _triton(z, codebook)
        want_idx, want_dist = _triton(z.contiguous(), codebook.contiguous())
        assert torch.equal(indices, want_idx) and torch.equal(distances, want_dist)
        check_vq(z, codebook, indices, distances)


def test_public_op_with_leading_dims():
    z = torch.randn(2, 5, 7, 16, device=DEVICE)
    codebook = torch.randn(100, 16, device=DEVICE)
    indices, distances = ops.vq_nearest(z, codebook, backend="triton", return_distance=True)
    assert indices.shape == (2, 5, 7) and distances.shape == (2, 5, 7)
    check_vq(z.reshape(-1, 16), codebook, indices.reshape(-1), distances.reshape(-1))


def test_empty_rows_and_bad_input():
    codebook = torch.randn(10, 8, device=DEVICE)
    indices, distances = _triton(torch.empty(0, 8, device=DEVICE), codebook)
    assert indices.shape == (0,) and distances.shape == (0,)
    with pytest.raises(TypeError, match="share one of"):
        _triton(torch.randn(3, 8, device=DEVICE), codebook.half())
    with pytest.raises(ValueError, match="D"):
        _triton(torch.randn(3, 9, device=DEVICE), codebook)


def test_fixed_config_pins_one_config_outside_the_interpreter(monkeypatch):
    """MUSEFAST_TRITON_FIXED_CONFIG=1 (GPU correctness runs): the plain kernel and one config's
    launch arguments; unset: the autotuner; under the interpreter: the interpreter's config."""
    import triton

    from musefast.kernels import _tuning
    from musefast.kernels.vq import _vq_nearest_kernel

    pinned = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2)
    kw = dict(configs=[pinned], pinned=pinned, interpreter={"BLOCK_N": 128}, key=["N_BUCKET"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _tuning.launcher(_vq_nearest_kernel, **kw) == (_vq_nearest_kernel, {"BLOCK_N": 128})
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("MUSEFAST_TRITON_FIXED_CONFIG", "1")
    kernel, launch = _tuning.launcher(_vq_nearest_kernel, **kw)
    assert kernel is _vq_nearest_kernel
    assert launch == {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    monkeypatch.delenv("MUSEFAST_TRITON_FIXED_CONFIG")
    kernel, launch = _tuning.launcher(_vq_nearest_kernel, **kw)
    assert isinstance(kernel, triton.runtime.Autotuner) and launch == {}
