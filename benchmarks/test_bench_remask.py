"""One decoding step (cfg_sample_remask) vs diffusers' CFG combine + AmusedScheduler.step, in
the same run.

GPU: B ∈ {1, 8, 32}, N ∈ {256, 1024, 4096}, K ∈ {1024, 8192, 16384}, fp16, g = 10 (target:
≥ 10× the diffusers step and ≥ 70% of HBM bandwidth at B=8, N=4096, K=8192).
CPU (2 threads): the target case B=2, N=256, K=8192 fp32 with g = 10 (target ≥ 10×), the same
without guidance on flat random logits (the worst case: no Gumbel work can be skipped), and
two small sizes. Every position is masked (step 0: the most work) and 253/256 stay masked.
The diffusers anchor is skipped when diffusers is not installed.
"""
import pytest
import torch

from musefast import ops
from timing import bench, record, seconds_per_call

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_THREADS = 2

if CUDA:
    CASES = [(b, n, k, torch.float16, True) for b in (1, 8, 32) for n in (256, 1024, 4096)
             for k in (1024, 8192, 16384)]
    BACKENDS = ["cuda", "triton"]
else:
    CASES = [(2, 256, 8192, torch.float32, True), (2, 256, 8192, torch.float32, False),
             (1, 256, 1024, torch.float32, True), (2, 1024, 1024, torch.float32, True)]
    BACKENDS = ["cpu"]


def _diffusers_step(cond, uncond, guidance_scale):
    """diffusers' AmusedPipeline CFG combine + AmusedScheduler.step at step 0, or None."""
    try:
        from diffusers import AmusedScheduler
    except ImportError:
        return None
    B, N, K = cond.shape
    mask_id = K + 63  # as aMUSEd: the mask id lies past the codebook (8255 for K = 8192)
    sched = AmusedScheduler(mask_token_id=mask_id)
    sched.set_timesteps(12, device=cond.device)
    sample = torch.full((B, N), mask_id, device=cond.device)
    gen = torch.Generator(device=cond.device).manual_seed(0)

    def step():
        out = cond if uncond is None else uncond + guidance_scale * (cond - uncond)
        return sched.step(out, sched.timesteps[0], sample, generator=gen).prev_sample

    return step


@pytest.fixture
def threads():
    """The CPU target of this benchmark is stated for 2 threads."""
    if CUDA:
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield CPU_THREADS
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,n,k,dtype,cfg", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cfg_sample_remask(benchmark, threads, backend, b, n, k, dtype, cfg):
    status = ops.backends(DEVICE)["cfg_sample_remask"][backend]
    if status != "ok":
        pytest.skip(status)
    g = 10.0 if cfg else 1.0
    cond = torch.randn(b, n, k, device=DEVICE, dtype=dtype)
    uncond = torch.randn(b, n, k, device=DEVICE, dtype=dtype) if cfg else None
    tokens = torch.zeros(b, n, dtype=torch.long, device=DEVICE)
    masked = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    num_to_mask = torch.full((b,), n * 253 // 256, device=DEVICE)
    benchmark.group = f"remask B={b} N={n} K={k} {str(dtype)[6:]} {'g=10' if cfg else 'no CFG'}"

    def fused():
        return ops.cfg_sample_remask(cond, uncond, tokens=tokens, masked=masked, num_to_mask=num_to_mask,
                                     guidance_scale=g, choice_temperature=2.0, seed=0, step=0, backend=backend)

    seconds = bench(benchmark, fused, DEVICE)
    anchors = {}
    reference_step = _diffusers_step(cond, uncond, g)
    if reference_step is not None and b * n * k <= (1 << 30):  # its fp32 probabilities must fit
        anchors["diffusers_step"] = seconds_per_call(reference_step, DEVICE, min_seconds=0.5)
    logits_bytes = (2 if cfg else 1) * b * n * k * cond.element_size()
    record(benchmark, seconds=seconds, anchors=anchors, bytes_moved=logits_bytes + b * n * 18)
    benchmark.extra_info["threads"] = threads
    benchmark.extra_info["diffusers_anchor"] = "diffusers_step" in anchors
