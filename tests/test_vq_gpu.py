"""vq_nearest on a GPU: the cuda and triton backends at real sizes against the reference.

Real size = an aMUSEd-like VQ encode batch: N = 65536 vectors, K = 8192 codes, D = 64, in
fp32/fp16/bf16. Plus odd shapes that reach every path of the kernels: D % 8 != 0 (scalar
staging), D = 80 and 200 (a short last D chunk in the tiled kernels), D = 512 (over 48 KB of
shared memory) and D = 1000 (the tensor-core kernel's row tile does not fit: SIMT fallback);
non-contiguous and misaligned inputs as the kernels receive them. The NaN contract is tested
for every backend in tests/test_vq.py. Skipped without CUDA (conftest); on a CUDA machine a
backend that cannot run — the CUDA kernels not compiled included — fails the test.
"""
import pytest
import torch

from musefast.ops.vq import VQ_NEAREST
from musefast.reference.vq import vq_nearest_l2

from test_vq_triton import check_vq
from vq_checks import assert_nearest

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(backend, z, codebook):
    reasons = VQ_NEAREST.availability(z, codebook)[backend]
    if reasons:
        # On a GPU machine both backends must run: CUDA kernels that were not compiled (no
        # nvcc, a failed build) would leave users on slower paths without a word.
        pytest.fail(f"{backend} cannot run on this GPU machine: {'; '.join(reasons)}")
    indices, distances = VQ_NEAREST(z, codebook, backend=backend, device_type="cuda")
    torch.cuda.synchronize()
    return indices, distances


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_size(backend, dtype, comparisons):
    N, K, D = 65536, 8192, 64
    z = torch.randn(N, D, device="cuda").to(dtype)
    codebook = torch.randn(K, D, device="cuda").to(dtype)
    indices, distances = _run(backend, z, codebook)
    check_vq(z, codebook, indices, distances, max_mismatch=1e-3)
    comparisons.add()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_size_self_match(backend, dtype, comparisons):
    K, D = 8192, 64
    codebook = torch.randn(K, D, device="cuda").to(dtype)
    perm = torch.cat([torch.randperm(K, device="cuda") for _ in range(8)])  # N = 65536
    indices, distances = _run(backend, codebook[perm], codebook)
    assert torch.equal(indices, perm)
    assert_nearest(codebook[perm], codebook, indices, distances)  # distances ~0
    comparisons.add()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_size_exact_ties(backend, dtype, comparisons):
    """Small integers: every score is exact, so results must equal the reference bit for bit,
    including the lowest index among the many exactly equidistant codes."""
    N, K, D = 65536, 8192, 64
    codebook = torch.randint(-2, 3, (K, D), device="cuda").to(dtype)
    codebook[K - 1] = codebook[0]
    codebook[4097] = codebook[4096]
    z = torch.randint(-2, 3, (N, D), device="cuda").to(dtype)
    z[:4] = codebook[[0, K - 1, 4096, 4097]]
    indices, distances = _run(backend, z, codebook)
    ref_idx, ref_dist = vq_nearest_l2(z, codebook)
    assert torch.equal(indices, ref_idx)
    assert torch.equal(distances, ref_dist)
    assert indices[:4].tolist() == [0, 0, 4096, 4096]
    comparisons.add()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "N,D,K",
    [(1, 8, 1), (97, 59, 1000), (1025, 64, 8191), (513, 80, 1000), (257, 200, 4097), (1025, 256, 1000),
     (300, 512, 777), (130, 1000, 300)],
)
def test_odd_shapes(backend, dtype, N, D, K, comparisons):
    z = torch.randn(N, D, device="cuda").to(dtype)
    codebook = torch.randn(K, D, device="cuda").to(dtype)
    indices, distances = _run(backend, z, codebook)
    check_vq(z, codebook, indices, distances)
    comparisons.add()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, dtype, comparisons):
    """Strided rows, a transposed codebook and a z whose storage starts off a 16-byte boundary.
    Only the ops layer makes inputs contiguous for the CUDA kernels, and ``.contiguous()`` of
    the misaligned-but-contiguous z is the same tensor: that z reaches the kernel as it is
    (its scalar-staging path). The Triton kernel takes any strides as given."""
    N, D, K = 4097, 64, 1000
    big = torch.randn(2 * N, 2 * D, device="cuda").to(dtype)
    strided = big[::2, 1 : 1 + D]
    misaligned = torch.randn(N * D + 1, device="cuda").to(dtype)[1:].view(N, D)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16
    codebook = torch.randn(D, K, device="cuda").to(dtype).t()
    for z in (strided, misaligned):
        indices, distances = _run(backend, z, codebook)
        want_idx, want_dist = _run(backend, z.contiguous().clone(), codebook.contiguous())
        assert torch.equal(indices, want_idx)
        torch.testing.assert_close(distances, want_dist, rtol=0, atol=1e-4)
        check_vq(z, codebook, indices, distances)
        comparisons.add()
