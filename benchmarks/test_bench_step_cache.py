"""Step cache: decoding with ``cache="fast"`` vs exact decoding, in the same run.

Model: aMUSEd's U-ViT (UVit2D), random weights, one image, 12 steps, guidance 10 (both CFG
branches batched). GPU: the real amused-256 architecture in fp16. CPU: a reduced layout
(4 layers x 256, 16x16 tokens, 8192 codes, fp32) so the suite stays short; the real-size CPU
figures come from ``scripts/eval_step_cache.py --part amused``. Recorded per case: the cached
decode time (pytest-benchmark), the exact decode time (anchor), the speedup, and the
transformer FLOPs per image of both (counted by ``torch.utils.flop_counter``).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.sampling import GuidedForward, MaskGitSampler
from timing import seconds_per_call, synced

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
REDUCED = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=4, in_channels=128, block_out_channels=128,
               block_num_heads=4, num_res_blocks=1, intermediate_size=704, cond_embed_dim=256,
               encoder_hidden_size=256)
STEPS = 12


@pytest.fixture(scope="module")
def forward():
    torch.manual_seed(0)
    cfg = UVit2DConfig(sample_size=16, **({} if CUDA else REDUCED))
    model = UVit2D(cfg).to(DEVICE, DTYPE).eval()
    hidden = torch.randn(2, 77, cfg.encoder_hidden_size, device=DEVICE, dtype=DTYPE)
    pooled = torch.randn(2, cfg.cond_embed_dim, device=DEVICE, dtype=DTYPE)
    micro = torch.tensor([256.0, 256, 0, 0, 6], device=DEVICE, dtype=DTYPE)
    both = model.prepare_context(hidden, pooled, micro)
    cond = model.prepare_context(hidden[1:], pooled[1:], micro)
    return model, GuidedForward(model, cond, both, uncond_first=True)


def _decode(model, forward, cache):
    sampler = MaskGitSampler("amused", num_steps=STEPS, guidance_scale=10.0, progress=False, cache=cache)
    tokens = torch.full((1, 16, 16), model.mask_token_id, device=DEVICE)
    with torch.no_grad():
        return sampler(forward, tokens, mask_token_id=model.mask_token_id, seed=0)


def _gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def test_step_cache_fast_vs_exact(benchmark, forward):
    model, fwd = forward
    exact = lambda: _decode(model, fwd, None)  # noqa: E731
    fast = lambda: _decode(model, fwd, "fast")  # noqa: E731
    exact_s = seconds_per_call(synced(exact, DEVICE), DEVICE, min_seconds=0.5, warmup=1)
    benchmark.pedantic(synced(fast, DEVICE), rounds=3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable (CI): time it here
    fast_s = stats.stats.median if stats else seconds_per_call(synced(fast, DEVICE), DEVICE, min_seconds=0.5,
                                                               warmup=1)
    exact_gf, fast_gf = _gflops(exact), _gflops(fast)
    benchmark.extra_info.update(
        model="amused-256" if CUDA else "reduced UVit2D", steps=STEPS, exact_ms=exact_s * 1e3, fast_ms=fast_s * 1e3,
        speedup=exact_s / fast_s, exact_gflops_per_image=exact_gf, fast_gflops_per_image=fast_gf,
        flop_reduction=exact_gf / fast_gf,
    )
    assert fast_gf < exact_gf  # the cache removes work whatever the timing noise
