"""vq_nearest latency per backend vs torch.cdist+argmin and addmm+argmin, in the same run.

GPU: N ∈ {256·B, 4096·B}, B ∈ {1, 8, 64}, K ∈ {1024, 8192, 16384}, D ∈ {64, 256}.
CPU: the target case N=4096, K=8192, D=64 (fp32) and two smaller ones.
"""
import pytest
import torch

from musefast import ops
from timing import bench, record, seconds_per_call

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if CUDA:
    CASES = [(n * b, k, d, dt) for b in (1, 8, 64) for n in (256, 4096) for k in (1024, 8192, 16384)
             for d in (64, 256) for dt in (torch.float16, torch.float32)]
    BACKENDS = ["cuda", "triton"]
else:
    CASES = [(4096, 8192, 64, torch.float32), (1024, 1024, 64, torch.float32), (256, 8192, 256, torch.float32)]
    BACKENDS = ["cpu"]


def _anchors(z, cb):
    def cdist_argmin():
        return torch.cdist(z, cb).argmin(1)

    cb_sqnorm = cb.float().pow(2).sum(1).to(cb.dtype)

    def addmm_argmin():  # open-muse's formulation
        return torch.addmm(cb_sqnorm, z, cb.T, alpha=-2.0).argmin(1)

    return {"cdist_argmin": cdist_argmin, "addmm_argmin": addmm_argmin}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_vq_nearest(benchmark, backend, n, k, d, dtype):
    if backend in ops.backends(DEVICE)["vq_nearest"] and ops.backends(DEVICE)["vq_nearest"][backend] != "ok":
        pytest.skip(ops.backends(DEVICE)["vq_nearest"][backend])
    if CUDA and n * k > (1 << 30):  # the anchors' N×K matrix would not fit
        pytest.skip("anchor's N×K distance matrix too large")
    z = torch.randn(n, d, device=DEVICE, dtype=dtype)
    cb = torch.randn(k, d, device=DEVICE, dtype=dtype)
    benchmark.group = f"vq N={n} K={k} D={d} {str(dtype)[6:]}"
    seconds = bench(benchmark, lambda: ops.vq_nearest(z, cb, backend=backend), DEVICE)
    anchors = {name: seconds_per_call(fn, DEVICE) for name, fn in _anchors(z, cb).items()}
    record(benchmark, seconds=seconds, anchors=anchors, flops=2.0 * n * k * d,
           bytes_moved=(n + k) * d * z.element_size() + n * 12, tensor_cores=dtype != torch.float32)
    benchmark.extra_info["threads"] = torch.get_num_threads()
