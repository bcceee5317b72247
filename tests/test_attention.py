"""ops.attention: every backend vs the reference (flash-attn tolerance rule), dispatch,
flash-attn key packing, bad input, and the Attention / CrossAttention modules.

Tolerance rule (flash-attn's): a backend's max error vs an exact reference must be at most
2× the max error of PyTorch's plain same-dtype math on the same inputs, plus a small eps.
The "exact" reference is musefast.reference.attention on float64 copies of the inputs.

The Triton interpreter is slow (its tl.dot is a plain numpy loop), so the CPU cases cover
every value of every axis (Lq, Lk, head dim, dtype, mask) without the full cross product;
a GPU runs each backend over GPU_CASES (marked ``gpu``).
"""

import pytest
import torch

from musefast import ops
from musefast.nn import Attention, CrossAttention, CrossAttentionKV
from musefast.ops.attention import ATTENTION, flash_attn_forward
from musefast.ops.registry import BackendUnavailableError
from musefast.reference.attention import attention as reference_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = {F32: 1e-6, F16: 1e-5, BF16: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = list(ATTENTION.backends)

# (Lq, Lk, head dim, dtype, masked): each Lq ∈ {1, 97, 256, 1025}, Lk ∈ {1, 77, 128, 300},
# D ∈ {32, 64, 80, 96, 128}, dtype and mask on/off appears several times, in varied pairs;
# every (Lq, Lk) pair appears once.
CASES = [
    (1, 77, 64, F16, True),
    (1, 300, 128, F32, False),
    (1, 1, 80, BF16, True),
    (97, 1, 32, F32, False),
    (97, 300, 80, F16, True),
    (97, 128, 96, BF16, False),
    (256, 128, 96, F32, True),
    (256, 77, 128, BF16, True),
    (256, 1, 80, F16, True),
    (256, 300, 32, F16, False),
    (1025, 77, 32, F32, True),
    (1025, 128, 64, F16, False),
    (1025, 1, 96, BF16, False),
    (97, 77, 128, F32, False),
    (256, 300, 64, BF16, True),
    (1, 128, 32, F16, False),
    (1025, 300, 80, F16, True),
]


def padding_mask(batch: int, lk: int, device=DEVICE) -> torch.Tensor:
    """Key padding masks of every kind: random holes, all keys masked, a padded suffix
    (text), all keys attended; cycled over the batch."""
    rows = []
    for b in range(batch):
        kind = b % 4
        if kind == 0:
            row = torch.rand(lk) < 0.6
        elif kind == 1:
            row = torch.zeros(lk, dtype=torch.bool)
        elif kind == 2:
            row = torch.arange(lk) < max(1, (lk * 2) // 5)
        else:
            row = torch.ones(lk, dtype=torch.bool)
        rows.append(row)
    return torch.stack(rows).to(device)


def make_inputs(b, h, lq, lk, d, dtype, masked, device=DEVICE):
    q = torch.randn(b, h, lq, d, device=device).to(dtype)
    k = torch.randn(b, h, lk, d, device=device).to(dtype)
    v = torch.randn(b, h, lk, d, device=device).to(dtype)
    return q, k, v, (padding_mask(b, lk, device) if masked else None)


def same_dtype_math(q, k, v, mask, scale=None):
    """PyTorch's plain attention in the inputs' dtype: the error yardstick of the rule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if mask is not None:
        out = torch.where(mask.any(-1)[:, None, None, None], out, 0)
    return out


def assert_within_rule(out, q, k, v, mask, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    exact = reference_attention(q.double(), k.double(), v.double(), mask, scale)
    err = (out.double() - exact).abs().max().item()
    yardstick = (same_dtype_math(q, k, v, mask, scale).double() - exact).abs().max().item()
    bound = 2 * yardstick + EPS[q.dtype]
    assert err <= bound, f"error {err:.3g} > 2 × {yardstick:.3g} + {EPS[q.dtype]:g}"
    if mask is not None:  # queries without an attended key are exact zeros
        assert bool((out[~mask.any(-1)] == 0).all())


def skip_unless_runs(backend, *args):
    reasons = ATTENTION.backends[backend].reasons(*args)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,d,dtype,masked", CASES)
def test_backend_matches_reference(backend, lq, lk, d, dtype, masked):
    batch = 4 if masked else 2  # masked: one batch element of each mask kind
    q, k, v, mask = make_inputs(batch, 2, lq, lk, d, dtype, masked)
    skip_unless_runs(backend, q, k, v, mask, None)
    out = ops.attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert_within_rule(out, q, k, v, mask)


# On a GPU: every backend on CUDA tensors, bf16 included. Each axis value appears several
# times, in varied pairs, not the full cross product: with one pinned Triton config
# (MUSEFAST_TRITON_FIXED_CONFIG=1) this is a couple of dozen kernel compiles, which a short GPU
# run can afford; the cross product was ~270 plus autotuning.
GPU_CASES = [
    (1, 77, 64, BF16, True),
    (97, 300, 80, BF16, True),
    (256, 128, 96, BF16, False),
    (1025, 77, 128, BF16, True),
    (256, 256, 64, BF16, False),
    (1, 1, 32, F16, False),
    (97, 77, 96, F16, True),
    (1025, 300, 64, F16, False),
    (256, 1, 128, F16, True),
    (4096, 77, 64, F16, True),
    (97, 128, 32, F32, True),
    (1025, 1, 80, F32, False),
    (256, 300, 128, F32, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "sdpa"])
@pytest.mark.parametrize("lq,lk,d,dtype,masked", GPU_CASES)
def test_gpu_backend_matches_reference(backend, lq, lk, d, dtype, masked, comparisons):
    q, k, v, mask = make_inputs(4 if masked else 2, 3, lq, lk, d, dtype, masked, device="cuda")
    reasons = ATTENTION.backends[backend].reasons(q, k, v, mask, None)
    if backend == "flash_attn" and (dtype == F32 or any("not installed" in r for r in reasons)):
        pytest.skip(f"flash_attn: {'; '.join(reasons) or 'no float32 kernel'}")
    assert not reasons, f"{backend} cannot run on this GPU: {'; '.join(reasons)}"
    out = ops.attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert out.device.type == "cuda"
    assert_within_rule(out, q, k, v, mask)
    comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_broadcast_inputs_and_scale(backend):
    # q as the modules make it: heads split out of (B, L, H·D), so not contiguous; k/v
    # broadcast over the batch (stride 0), as one text shared by every image would be.
    lq, lk, h, d = 97, 77, 2, 64
    q = torch.randn(3, lq, h, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, h, lk, d, device=DEVICE).expand(3, h, lk, d)
    v = torch.randn(1, lk, h, d, device=DEVICE).transpose(1, 2).expand(3, h, lk, d)
    mask = padding_mask(3, lk)
    assert not q.is_contiguous() and k.stride(0) == 0
    skip_unless_runs(backend, q, k, v, mask, 0.3)
    out = ops.attention(q, k, v, key_padding_mask=mask, scale=0.3, backend=backend)
    assert_within_rule(out, q, k, v, mask, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_stay_finite(backend):
    # scores of ±~500 overflow exp without the running-max shift
    q, k, v, mask = make_inputs(4, 1, 33, 70, 32, F32, True)
    q = q * 4.0
    skip_unless_runs(backend, q, k, v, mask, None)
    out = ops.attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert_within_rule(out, q, k, v, mask)


def test_cpu_auto_selects_bmm_for_bf16_sdpa_otherwise_and_env_override(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 5, 7, 32, F32, False, device="cpu")
    assert ATTENTION.select(None, "cpu", q, k, v, None, None).name == "sdpa"
    bf = [t.to(BF16) for t in (q, k, v)]
    assert ATTENTION.select(None, "cpu", *bf, None, None).name == "bmm"
    monkeypatch.setenv("MUSEFAST_BACKEND", "attention=reference")
    assert ATTENTION.select(None, "cpu", q, k, v, None, None).name == "reference"
    assert "attention" in ops.backends("cpu")
    assert ops.backends("cpu")["attention"]["reference"] == "ok"


def test_unavailable_backend_asked_for_raises_with_reasons():
    q, k, v, _ = make_inputs(1, 2, 5, 7, 32, F32, False, device="cpu")
    with pytest.raises(BackendUnavailableError, match="flash_attn"):
        ops.attention(q, k, v, backend="flash_attn")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.attention(q, k, v, backend="nope")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = make_inputs(1, 2, 5, 7, 32, F32, False, device="cpu")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.attention(q, k, v, backend="triton")


# -- the Triton kernel compiles for real GPUs (ahead of time, no GPU needed) ------------------

_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from musefast.kernels.attention import _attention_fwd_kernel as kernel

results = []
for arch, dtype, head_dim, masked, block_m, block_n, warps, stages in json.loads(sys.argv[1]):
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HAS_MASK=masked,
                  IEEE=dtype == "fp32", BLOCK_M=block_m, BLOCK_N=block_n)
    pointer = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}",
               "mask_ptr": "*u8", "kv_end_ptr": "*i32", "qk_scale": "fp32"}
    signature = {n: "constexpr" if n in consts else pointer.get(n, "i32") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    results.append(dict(cubin=len(compiled.asm["cubin"]), mma="mma" in ptx, tf32="tf32" in ptx,
                        shared=compiled.metadata.shared))
print(json.dumps(results))
"""

COMPILE_CONFIGS = [
    (90, "fp16", 80, True, 128, 64, 8, 3),  # Hopper wgmma path, padded head dim
    (80, "bf16", 96, False, 64, 32, 4, 4),  # Ampere mma path, bf16 (the interpreter has none)
    (90, "fp32", 128, True, 32, 32, 2, 3),  # fp32 must stay IEEE: no TF32
    (90, "fp16", 256, True, 64, 32, 4, 2),  # the pinned config (MUSEFAST_TRITON_FIXED_CONFIG=1), widest head
]


def test_triton_kernel_compiles_for_gpu():
    """The interpreter is more permissive than the compiler: compile to cubin for
    sm80/sm90 — in a subprocess, since the interpreter cannot share a process with codegen."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(COMPILE_CONFIGS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for config, result in zip(COMPILE_CONFIGS, results):
        assert result["cubin"] > 0, config
        assert result["shared"] <= 163 * 1024, (config, result)  # fits an A100's (and so an H100's) 163+ KB
        if config[1] == "fp32":  # IEEE fp32 dots run on FMA units: no (TF32) tensor-core mma
            assert not result["tf32"] and not result["mma"], config
        else:
            assert result["mma"], config


# -- flash-attn: key packing checked on CPU with a stand-in for the package -----------------

class _FakeFlashAttn:
    """flash-attn's two entry points, in plain PyTorch, recording what they were given."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False):
        assert not causal and q.dim() == 4  # (B, L, H, D)
        self.calls.append(("dense", q.shape, k.shape))
        return reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                   softmax_scale).transpose(1, 2)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False):
        assert not causal and q.dim() == 3  # (total, H, D)
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        self.calls.append(("varlen", q.shape, k.shape, cu_seqlens_q.tolist(), cu_seqlens_k.tolist()))
        out = torch.full_like(q, float("nan"))  # rows of a sequence without keys: unspecified
        for b in range(len(cu_seqlens_q) - 1):
            qs, qe = cu_seqlens_q[b], cu_seqlens_q[b + 1]
            ks, ke = cu_seqlens_k[b], cu_seqlens_k[b + 1]
            assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
            if ke > ks:
                out[qs:qe] = reference_attention(
                    q[None, qs:qe].transpose(1, 2), k[None, ks:ke].transpose(1, 2), v[None, ks:ke].transpose(1, 2),
                    None, softmax_scale,
                ).transpose(1, 2)[0]
        return out


@pytest.mark.parametrize("masked", [False, True])
def test_flash_attn_packs_keys_never_queries(masked):
    fake = _FakeFlashAttn()
    b, h, lq, lk, d = 4, 2, 9, 13, 16
    q, k, v, mask = make_inputs(b, h, lq, lk, d, F32, masked, device="cpu")
    out = flash_attn_forward(fake, q, k, v, mask, None)
    assert_within_rule(out, q, k, v, mask)
    if not masked:
        assert fake.calls == [("dense", (b, lq, h, d), (b, lk, h, d))]
        return
    kind, q_shape, k_shape, cu_q, cu_k = fake.calls[0]
    assert kind == "varlen"
    assert q_shape == (b * lq, h, d)  # every image query kept, whatever the key mask says
    assert cu_q == [i * lq for i in range(b + 1)]
    kept = mask.sum(1)
    assert k_shape == (int(kept.sum()), h, d)
    assert cu_k == [0] + kept.cumsum(0).tolist()


# -- bad input: a clear error naming the argument, on every backend, before any kernel ------

def _good():
    q, k, v, mask = make_inputs(2, 2, 5, 7, 32, F32, True, device="cpu")
    return dict(q=q, k=k, v=v, key_padding_mask=mask)


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=a["q"][0]), ValueError, "q must have shape"),
    ("k rank", lambda a: a.update(k=a["k"].flatten(0, 1)), ValueError, "k must have shape"),
    ("head dim", lambda a: a.update(k=a["k"][..., :16], v=a["v"][..., :16]), ValueError, "head dim"),
    ("k/v shape", lambda a: a.update(v=a["v"][:, :, :6]), ValueError, "k and v"),
    ("batch", lambda a: a.update(q=a["q"][:1]), ValueError, r"\(B, H\)"),
    ("int dtype", lambda a: a.update(v=a["v"].long()), TypeError, "v must be float32"),
    ("mixed dtype", lambda a: a.update(q=a["q"].half()), TypeError, "share one dtype"),
    ("not a tensor", lambda a: a.update(k=a["k"].tolist()), TypeError, "k must be a torch.Tensor"),
    ("mask dtype", lambda a: a.update(key_padding_mask=a["key_padding_mask"].float()), TypeError, "bool"),
    ("mask shape", lambda a: a.update(key_padding_mask=a["key_padding_mask"][:, :5]), ValueError,
     "key_padding_mask must have shape"),
    ("mask 3-D", lambda a: a.update(key_padding_mask=a["key_padding_mask"][:, None]), ValueError,
     "key_padding_mask must have shape"),
    ("mixed devices", lambda a: a.update(k=a["k"].to("meta")), ValueError, "one device"),
    ("mask device", lambda a: a.update(key_padding_mask=a["key_padding_mask"].to("meta")), ValueError,
     "key_padding_mask is on"),
    ("no keys", lambda a: a.update(k=a["k"][:, :, :0], v=a["v"][:, :, :0],
                                   key_padding_mask=a["key_padding_mask"][:, :0]), ValueError, "Lk >= 1"),
    ("scale type", lambda a: a.update(scale="0.1"), TypeError, "scale"),
    ("scale nan", lambda a: a.update(scale=float("nan")), ValueError, "scale"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,spoil,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, name, spoil, error, match):
    args = _good()
    spoil(args)
    with pytest.raises(error, match=match):
        ops.attention(**args, backend=backend)


# -- modules ---------------------------------------------------------------------------------

def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _heads(x, h):
    b, l, _ = x.shape
    return x.view(b, l, h, -1).transpose(1, 2)


def _by_hand(x, context, wq, wk, wv, module, mask):
    """Attention written out from the module's weights: the definition of the modules."""
    def linear(t, weight_bias):
        weight, bias = weight_bias
        return t @ weight.T + (0 if bias is None else bias)

    h = module.num_heads
    q, k, v = (_heads(t, h) for t in (linear(x, wq), linear(context, wk), linear(context, wv)))
    if module.q_norm is not None:
        q = _rms(q, module.q_norm.weight, module.q_norm.eps)
        k = _rms(k, module.k_norm.weight, module.k_norm.eps)
    out = reference_attention(q, k, v, mask, module.scale)
    b, _, l, _ = out.shape
    return module.to_out(out.transpose(1, 2).reshape(b, l, -1))


def _randomize_norms(module):
    for norm in (module.q_norm, module.k_norm):
        if norm is not None:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("qk_norm,bias", [(False, False), (True, True)])
def test_self_attention_module(backend, qk_norm, bias):
    m = Attention(64, 4, bias=bias, qk_norm=qk_norm, backend=backend)
    _randomize_norms(m)
    x = torch.randn(3, 33, 64)
    mask = padding_mask(3, 33, "cpu")
    skip_unless_runs(backend, torch.empty(1, 4, 33, 16), torch.empty(1, 4, 33, 16), torch.empty(1, 4, 33, 16), None, None)
    with torch.no_grad():
        out = m(x, key_padding_mask=mask)
        wq, wk, wv = m.to_qkv.weight.chunk(3)
        bq, bk, bv = m.to_qkv.bias.chunk(3) if bias else (None,) * 3
        expected = _by_hand(x, x, (wq, bq), (wk, bk), (wv, bv), m, mask)
    assert out.shape == (3, 33, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("qk_norm,bias", [(False, False), (True, True)])
def test_cross_attention_module_and_precomputed_kv(backend, qk_norm, bias):
    m = CrossAttention(64, 2, head_dim=32, context_dim=48, bias=bias, qk_norm=qk_norm, backend=backend)
    _randomize_norms(m)
    x, context = torch.randn(2, 40, 64), torch.randn(2, 77, 48)
    mask = padding_mask(2, 77, "cpu")
    skip_unless_runs(backend, torch.empty(1, 2, 40, 32), torch.empty(1, 2, 77, 32), torch.empty(1, 2, 77, 32), None, None)
    with torch.no_grad():
        on_the_fly = m(x, context, key_padding_mask=mask)
        kv = m.precompute_kv(context)
        assert isinstance(kv, CrossAttentionKV) and kv.k.shape == (2, 2, 77, 32)
        precomputed = m(x, kv=kv, key_padding_mask=mask)
        # the same K/V serve a second decoding step with other image tokens
        x2 = torch.randn(2, 40, 64)
        second = m(x2, kv=kv, key_padding_mask=mask)
        wk, wv = m.to_kv.weight.chunk(2)
        bk, bv = m.to_kv.bias.chunk(2) if bias else (None, None)
        bq = m.to_q.bias if bias else None
        expected = _by_hand(x, context, (m.to_q.weight, bq), (wk, bk), (wv, bv), m, mask)
        expected2 = _by_hand(x2, context, (m.to_q.weight, bq), (wk, bk), (wv, bv), m, mask)
    assert torch.equal(on_the_fly, precomputed)
    torch.testing.assert_close(on_the_fly, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected2, rtol=1e-5, atol=1e-5)


def test_cross_attention_needs_exactly_one_of_context_and_kv():
    m = CrossAttention(32, 2)
    x, context = torch.randn(1, 4, 32), torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="exactly one"):
        m(x)
    with pytest.raises(ValueError, match="exactly one"):
        m(x, context, kv=m.precompute_kv(context))
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
