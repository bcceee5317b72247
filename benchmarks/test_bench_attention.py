"""ops.attention forward per backend vs torch SDPA (without and with a mask) and flash-attn,
in the same run.

GPU (fp16): self-attention at seq 256/1024/4096, D ∈ {64, 128}, without and with a padding
mask; cross-attention 256×77 and 4096×77 with padded text. Width 1024 (H = 1024 / D) and a
batch that fills the GPU. musefast and the anchors are timed with CUDA events around a loop
of calls after warm-up (one synchronize at the end); TFLOP/s counts the nominal 4·B·H·Lq·Lk·D
(what SDPA computes), so a backend that skips padded keys shows above its true rate — the
attended fraction of keys is recorded next to it.
CPU (fp32): small sizes, sdpa and reference only (the Triton interpreter is not benchmarked).

Anchors: ``sdpa`` (no mask: its best backend may run), ``sdpa_mask`` (SDPA with the boolean
mask), ``sdpa_nomask`` on masked cases (SDPA ignoring the padding, as diffusers' aMUSEd
does), ``flash_attn`` when installed.
"""
import pytest
import torch
import torch.nn.functional as F

from musefast import ops
from musefast.ops.attention import ATTENTION
from timing import bench, record, seconds_per_call

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
WIDTH = 1024  # model width: H = WIDTH // D

if CUDA:
    DTYPE = torch.float16
    # (kind, Lq, Lk, D, masked)
    CASES = [("self", s, s, d, m) for s in (256, 1024, 4096) for d in (64, 128) for m in (False, True)]
    CASES += [("cross", s, 77, d, True) for s in (256, 4096) for d in (64, 128)]
    BACKENDS = ["triton", "flash_attn", "sdpa"]
    TOKENS = 1 << 16  # B·Lq: enough query rows to fill an H100/H200
else:
    DTYPE = torch.float32
    CASES = [("self", 64, 64, 64, False), ("self", 256, 256, 64, False), ("self", 256, 256, 64, True),
             ("cross", 256, 77, 64, True)]
    BACKENDS = ["sdpa", "reference"]
    TOKENS = 512


def _padding_mask(batch, lk, min_keep, generator):
    """Suffix padding (prompts of random length), at least ``min_keep`` keys attended."""
    lengths = torch.randint(min_keep, lk + 1, (batch,), generator=generator)
    return (torch.arange(lk)[None, :] < lengths[:, None]).to(DEVICE)


def _inputs(kind, lq, lk, d, masked):
    g = torch.Generator().manual_seed(0)
    batch, heads = max(1, TOKENS // lq), WIDTH // d if CUDA else 4
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(DEVICE, DTYPE) for n in (lq, lk, lk))
    mask = None
    if masked:  # self: up to 25% padding; cross: prompts of 8..77 tokens
        mask = _padding_mask(batch, lk, (3 * lk) // 4 if kind == "self" else 8, g)
    return q, k, v, mask


def _anchors(q, k, v, mask):
    anchors = {}
    if mask is None:
        anchors["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    else:
        attn_mask = mask[:, None, None, :]
        anchors["sdpa_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        anchors["sdpa_nomask"] = lambda: F.scaled_dot_product_attention(q, k, v)
    if not ATTENTION.backends["flash_attn"].reasons(q, k, v, mask, None):
        anchors["flash_attn"] = lambda: ops.attention(q, k, v, key_padding_mask=mask, backend="flash_attn")
    return anchors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,lq,lk,d,masked", CASES, ids=lambda v: str(v))
def test_attention(benchmark, backend, kind, lq, lk, d, masked):
    q, k, v, mask = _inputs(kind, lq, lk, d, masked)
    reasons = ATTENTION.backends[backend].reasons(q, k, v, mask, None)
    if reasons:
        pytest.skip("; ".join(reasons))
    benchmark.group = f"attention {kind} Lq={lq} Lk={lk} D={d} {'padded' if masked else 'no mask'}"

    def run():
        return ops.attention(q, k, v, key_padding_mask=mask, backend=backend)

    seconds = bench(benchmark, run, DEVICE, rounds=5)
    if CUDA:  # CUDA events around a loop, one sync at the end (bench syncs every call)
        seconds = seconds_per_call(run, DEVICE)
    anchors = {name: seconds_per_call(fn, DEVICE) for name, fn in _anchors(q, k, v, mask).items()}
    B, H = q.shape[:2]
    record(benchmark, seconds=seconds, anchors=anchors, flops=4.0 * B * H * lq * lk * d,
           tensor_cores=DTYPE != torch.float32)
    info = benchmark.extra_info
    info.update(batch=B, heads=H, dtype=str(DTYPE)[6:], backend=backend)
    info["attended_fraction"] = 1.0 if mask is None else float(mask.float().mean())
    if not CUDA:
        info["threads"] = torch.get_num_threads()
