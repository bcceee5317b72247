"""vq_nearest: reference and cpu backends, dispatch, bad input, VectorQuantizer."""
import pytest
import torch

from musefast import ops
from musefast.nn import VectorQuantizer
from musefast.ops.registry import BackendUnavailableError
from backends import device_of, params
from vq_checks import assert_nearest

CPU_BACKENDS = ["reference", "cpu"]
SHAPES = [(n, d, k) for n in (1, 97, 1025) for d in (8, 59, 64, 256) for k in (1, 1000, 8192)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_nearest_matches_definition(backend, n, d, k):
    z, cb = torch.randn(n, d), torch.randn(k, d)
    idx, dist = ops.vq_nearest(z, cb, return_distance=True, backend=backend)
    assert idx.shape == (n,) and dist.shape == (n,)
    assert_nearest(z, cb, idx, dist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    z, cb = torch.randn(333, 64).to(dtype), torch.randn(1000, 64).to(dtype)
    idx, dist = ops.vq_nearest(z, cb, return_distance=True, backend=backend)
    # the definition is over the inputs' exact values, whatever their dtype
    assert_nearest(z.float(), cb.float(), idx, dist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_match_identity(backend):
    cb = torch.randn(8192, 64) * 3
    perm = torch.randperm(8192)[:1025]
    assert torch.equal(ops.vq_nearest(cb[perm], cb, backend=backend), perm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lowest_index(backend):
    base = torch.randn(10, 16)
    cb = torch.cat([base, base, base])  # every code appears 3 times: 0..9, 10..19, 20..29
    z = base[torch.tensor([3, 7, 0, 9])] + 0.01 * torch.randn(4, 16)
    idx = ops.vq_nearest(z, cb, backend=backend)
    assert torch.equal(idx, torch.tensor([3, 7, 0, 9]))
    # exact equidistance: z midway between two distinct codes
    cb2 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 5.0]])
    assert ops.vq_nearest(torch.tensor([[1.0, 0.0]]), cb2, backend=backend).item() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_and_leading_dims(backend):
    feat = torch.randn(2, 64, 5, 7)  # NCHW feature map viewed channels-last: non-contiguous
    z = feat.permute(0, 2, 3, 1)
    cb_big = torch.randn(300, 128)
    cb = cb_big[:, ::2]  # strided codebook
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx, dist = ops.vq_nearest(z, cb, return_distance=True, backend=backend)
    assert idx.shape == (2, 5, 7) and dist.shape == (2, 5, 7)
    assert_nearest(z.contiguous(), cb.contiguous(), idx, dist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cosine_metric(backend):
    z, cb = torch.randn(200, 32), torch.randn(500, 32)
    idx = ops.vq_nearest(z, cb, metric="cosine", backend=backend)
    sims = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(cb, dim=1).T
    chosen = sims.gather(1, idx[:, None]).squeeze(1)
    assert bool((sims.max(1).values - chosen <= 1e-5).all())


def test_cpu_and_reference_agree_exactly_on_separated_codes():
    # well separated data: there are no near-ties, so indices must be identical
    cb = torch.randn(1000, 59) * 10
    z = cb[torch.randint(0, 1000, (1025,))] + 0.1 * torch.randn(1025, 59)
    assert torch.equal(ops.vq_nearest(z, cb, backend="cpu"), ops.vq_nearest(z, cb, backend="reference"))


def test_default_backend_on_cpu_is_the_compiled_kernel():
    from musefast.ops.vq import VQ_NEAREST

    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    assert VQ_NEAREST.select(None, "cpu", z, cb).name == "cpu"


@pytest.mark.parametrize(
    "z,cb,exc,words",
    [
        (torch.randn(4, 8), torch.randn(16, 9), ValueError, "last dim"),
        (torch.randn(4, 8), torch.randn(2, 16, 8), ValueError, "codebook"),
        (torch.randn(4, 8), torch.randn(0, 8), ValueError, "empty"),
        (torch.randint(0, 5, (4, 8)), torch.randn(16, 8), TypeError, "z must be float"),
        (torch.randn(4, 8), torch.randint(0, 5, (16, 8)), TypeError, "codebook must be float"),
        (torch.tensor(1.0), torch.randn(16, 1), ValueError, "scalar"),
        (torch.randn(4, 8), torch.randn(16, 8, device="meta"), ValueError, "device"),
        ([[1.0]], torch.randn(16, 1), TypeError, "z must be a torch.Tensor"),
    ],
)
def test_bad_input(z, cb, exc, words):
    for backend in (None, "reference", "cpu"):
        with pytest.raises(exc, match=words):
            ops.vq_nearest(z, cb, backend=backend)


def test_bad_metric():
    with pytest.raises(ValueError, match="metric"):
        ops.vq_nearest(torch.randn(4, 8), torch.randn(16, 8), metric="l1")


def test_lookup():
    cb = torch.randn(50, 8)
    idx = torch.randint(0, 50, (2, 3, 4))
    assert torch.equal(ops.vq_lookup(idx, cb), cb[idx])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        ops.vq_lookup(torch.tensor([50]), cb)
    with pytest.raises(TypeError, match="indices"):
        ops.vq_lookup(torch.tensor([1.0]), cb)


def test_vector_quantizer_layouts_and_state_dict():
    vq = VectorQuantizer(1000, 16)
    # diffusers' VectorQuantizer keeps its codebook under embedding.weight: loads unchanged
    codebook = torch.randn(1000, 16)
    vq.load_state_dict({"embedding.weight": codebook})
    feat = torch.randn(2, 16, 6, 5)
    z_q, idx = vq.quantize(feat)
    assert idx.shape == (2, 6, 5) and z_q.shape == feat.shape
    assert torch.equal(idx, ops.vq_nearest(feat.permute(0, 2, 3, 1), codebook, backend="reference"))
    assert torch.equal(z_q, codebook[idx].permute(0, 3, 1, 2))
    z_q_last, idx_last = vq.quantize(feat.permute(0, 2, 3, 1), channels_last=True)
    assert torch.equal(idx_last, idx) and torch.equal(z_q_last, z_q.permute(0, 2, 3, 1))
    assert torch.equal(vq.lookup(idx), z_q)
    with pytest.raises(ValueError, match="channels"):
        vq.quantize(torch.randn(2, 15, 6, 5))


def test_vector_quantizer_straight_through_and_loss():
    vq = VectorQuantizer(64, 8)
    z = torch.randn(1, 8, 4, 4, requires_grad=True)
    z_q, idx, loss = vq(z)
    assert torch.allclose(z_q, vq.lookup(idx), atol=1e-6)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and vq.embedding.weight.grad is not None


def test_requested_backend_that_cannot_run_raises_with_reasons():
    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(BackendUnavailableError, match="cuda.*needs cuda tensors"):
        ops.vq_nearest(z, cb, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.vq_nearest(z, cb, backend="nope")


@pytest.mark.parametrize("backend", params("reference", "cpu", "triton", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_rows_get_index_zero_and_nan_distance(backend, dtype, comparisons):
    """The NaN contract on every backend: index 0 and distance NaN (a clamp at 0 written as a
    max would turn that NaN into 0 on a GPU). D = 80: the NaN also sits in a short last chunk."""
    device = device_of(backend)
    z, cb = torch.randn(6, 80).to(dtype), torch.randn(300, 80).to(dtype)
    z[2, 3] = float("nan")
    z[4, 79] = float("nan")  # in the last D chunk of the tiled kernels
    z[5] = float("nan")
    idx, dist = ops.vq_nearest(z.to(device), cb.to(device), return_distance=True, backend=backend)
    idx, dist = idx.cpu(), dist.cpu()
    assert idx[[2, 4, 5]].tolist() == [0, 0, 0] and bool(torch.isnan(dist[[2, 4, 5]]).all())
    keep = torch.tensor([0, 1, 3])
    assert_nearest(z[keep], cb, idx[keep], dist[keep])
    comparisons.add(2)
