"""cfg_sample_remask: Philox, the reference definition, every backend against it, statistics,
the NaN policy and bad input.

Backend-parametrized tests run each backend on its own device (tests/backends.py): ``cuda``
and, on a GPU machine, ``triton`` on CUDA tensors (marked ``gpu``), the rest on CPU tensors.
Each test counts its comparisons (conftest fails a gpu test that made none)."""
import math

import pytest
import torch

from musefast import ops
from musefast.ops.registry import BackendUnavailableError
from musefast.reference import philox
from musefast.reference import remask as ref
from backends import device_of, params
from remask_checks import assert_step_matches, make_inputs


def run(logits, uncond=None, *, backend, **kw):
    """The op on ``backend``'s device: tensor inputs are moved there (views made on that device
    stay views), and the results come back on the CPU."""
    device = device_of(backend)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    tokens, masked = ops.cfg_sample_remask(logits.to(device), None if uncond is None else uncond.to(device),
                                           backend=backend, **kw)
    assert tokens.device.type == device and masked.device.type == device
    return tokens.cpu(), masked.cpu()


def reference_trace(logits, uncond, tokens, masked, num_to_mask, **kw):
    return ref.step_trace(logits.cpu(), None if uncond is None else uncond.cpu(), tokens=tokens.cpu(),
                          masked=masked.cpu(), num_to_mask=num_to_mask.cpu(), **kw)


# -- Philox ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctr,key,expected", [
    # Random123 known-answer vectors of Philox4x32-10 (kat_vectors)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    out = philox.philox4x32(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(w) for w in out) == expected


def test_uniforms_avoid_0_and_1_and_gumbel_is_finite():
    words = torch.tensor([0, 1, 511, 512, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFF])
    u = philox.uniform_from_bits(words)
    assert u.dtype == torch.float32
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1 - 2.0**-24
    g = philox.gumbel_from_uniform(u)
    assert bool(torch.isfinite(g).all()) and float(g.max()) < 17 and float(g.min()) > -3


def test_choice_noise_is_standard_gumbel():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = philox.choice_gumbel(seed=7, step=3, batch_size=16, seq_len=1024).double().flatten()
    # Kolmogorov-Smirnov at a false-alarm rate of 1e-3 (deterministic: fixed seed)
    assert scipy_stats.kstest(g.numpy(), "gumbel_r").pvalue > 1e-3
    other = philox.choice_gumbel(seed=7, step=4, batch_size=16, seq_len=1024)
    assert not torch.equal(g.float().reshape(16, 1024), other)


# -- every backend against the reference ------------------------------------------------------

CASES = [
    # B, N, K, dtype, cfg, guidance, tau, choice_tau, top_k, confidence
    (2, 97, 1000, torch.float32, True, 3.0, 1.0, 2.0, None, "logprob"),
    (1, 1, 1, torch.float32, False, 1.0, 1.0, 1.0, None, "logprob"),
    (3, 97, 8191, torch.float16, True, 10.0, 1.0, 4.5, None, "logprob"),
    (2, 1025, 1000, torch.float32, False, 1.0, 0.7, 1.0, None, "logprob"),
    (2, 97, 1000, torch.bfloat16, True, 5.0, 1.0, 0.0, 100, "prob"),
    (2, 97, 517, torch.float32, False, 1.0, 0.0, 2.0, None, "logprob"),
    (2, 59, 1000, torch.float32, True, 1.0, 1.5, 0.5, 1, "logprob"),
]
# The Triton interpreter is slow and has no bfloat16: small fp32/fp16 cases.
TRITON_CASES = [
    (2, 37, 1000, torch.float32, True, 3.0, 1.0, 2.0, None, "logprob"),
    (1, 3, 8191, torch.float16, False, 1.0, 0.8, 1.0, None, "logprob"),
    (2, 1, 1, torch.float32, False, 1.0, 1.0, 1.0, None, "logprob"),
    (2, 23, 300, torch.float16, True, 4.0, 1.0, 0.0, 40, "prob"),
    (2, 23, 300, torch.float32, False, 1.0, 0.0, 2.0, None, "logprob"),
]


_TRACES: dict = {}


def _trace(case, scale, logits, uncond, kw):
    """The reference's trace of a case, computed once for all backends (the largest GPU case
    takes the CPU reference tens of seconds)."""
    if (case, scale) not in _TRACES:
        _TRACES.clear()  # cases come grouped by parametrization order: keep one
        _TRACES[(case, scale)] = reference_trace(logits, uncond, **kw)
    return _TRACES[(case, scale)]


def _check_backend(backend, case, scale=2.0, *, cfg_halves=False):
    """One step on ``backend`` vs the reference's trace, up to counted near-ties. cfg_halves:
    the cond/uncond logits are the two halves (chunk(2)) of one (2B, N, K) batch on the
    backend's device, as a batched CFG forward returns them."""
    B, N, K, dtype, cfg, g, tau, ct, top_k, confidence = case
    logits, uncond, tokens, masked, ntm = make_inputs(B, N, K, dtype, cfg=cfg, seed=B * N + K, scale=scale)
    kw = dict(tokens=tokens, masked=masked, num_to_mask=ntm, guidance_scale=g, temperature=tau,
              choice_temperature=ct, top_k=top_k, confidence=confidence, seed=2**63 + 12345, step=7)
    trace = _trace(case, scale, logits, uncond, kw)
    if cfg_halves and uncond is not None:
        uncond, logits = torch.cat([uncond, logits]).to(device_of(backend)).chunk(2)
        assert logits.storage_offset() > 0  # a view into the batch, not a copy
    out_tokens, out_masked = run(logits, uncond, backend=backend, **kw)
    assert out_tokens.shape == (B, N) and out_masked.shape == (B, N)
    scale = 1.0 + float(logits.float().abs().max()) * (abs(g) * 2 + 1) / (tau or 1.0) + 17
    return assert_step_matches(trace, out_tokens, out_masked, value_scale=scale, num_to_mask=ntm)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_backend_matches_reference(case):
    counts = _check_backend("cpu", case)
    print("near-ties:", counts)


@pytest.mark.parametrize("backend", params("triton"))
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_backend_matches_reference(backend, case, comparisons):
    counts = _check_backend(backend, case, cfg_halves=True)
    comparisons.add()
    print("near-ties:", counts)


@pytest.mark.parametrize("backend", params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("scale,tau", [(2.0, 0.01), (2.0, 1e6), (1e30, 1.0), (1e-30, 1.0), (3e38, 0.5)])
def test_extreme_temperatures_and_magnitudes(backend, scale, tau, comparisons):
    """The fast kernels skip the noise of tokens that cannot win (exact by construction):
    check it at temperatures that skip almost all / nothing, and at extreme logit scales."""
    case = (2, 17, 300, torch.float32, False, 1.0, tau, 1.0, None, "logprob")
    counts = _check_backend(backend, case, scale=scale)
    comparisons.add()
    print("near-ties:", counts)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES + [
    (2, 4097, 1000, torch.float16, True, 10.0, 1.0, 2.0, None, "logprob"),  # selection by sort
    # block selection at N max; K = 2048 (not 8192) keeps the CPU reference of this case to a few
    # seconds of a short GPU run (K = 8191 is covered above)
    (8, 4096, 2048, torch.bfloat16, True, 10.0, 1.0, 2.0, None, "logprob"),
    (2, 33, 16384, torch.float16, False, 1.0, 0.5, 1.0, 5, "prob"),
], ids=str)
def test_gpu_backends_match_reference(backend, case, comparisons):
    # CFG cases take their logits as the strided halves of one batch, as the pipelines do
    counts = _check_backend(backend, case, cfg_halves=True)
    comparisons.add()
    print("near-ties:", counts)


@pytest.mark.parametrize("backend", params("reference", "cpu", "triton", "cuda"))
def test_strided_and_noncontiguous_logits(backend, comparisons):
    B, N, K = 2, 40, 300
    dev = device_of(backend)
    both = torch.randn(2 * B, N, K, device=dev)
    uncond, cond = both.chunk(2)  # views of one (2B, N, K) batch, as a CFG forward returns
    permuted = torch.randn(B, K, N, device=dev).permute(0, 2, 1)  # last dim not contiguous
    strided = torch.randn(B, 2 * N, K, device=dev)[:, ::2]
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.rand(B, N) < 0.8
    for lc, lu in ((cond, uncond), (permuted, None), (strided, strided.flip(0))):
        kw = dict(tokens=tokens, masked=masked, num_to_mask=5, guidance_scale=2.0, seed=1, step=0)
        expected = run(lc.cpu(), None if lu is None else lu.cpu(), backend="reference", **kw)
        got = run(lc, lu, backend=backend, **kw)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        comparisons.add()


# -- semantics ---------------------------------------------------------------------------------

BACKENDS = params("reference", "cpu", "triton", "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_temperature_is_argmax_with_lowest_index(backend, comparisons):
    B, N, K = 2, 50, 200
    logits = torch.randn(B, N, K)
    logits[0, 0, 7] = logits[0, 0, 150] = 100.0  # a tie: the lower index wins
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool)
    out, _ = run(logits, tokens=tokens, masked=masked, num_to_mask=0, temperature=0.0, seed=3, step=1,
                 backend=backend)
    assert torch.equal(out, logits.argmax(-1))
    assert int(out[0, 0]) == 7
    comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_formula(backend, comparisons):
    B, N, K = 2, 30, 64
    cond, uncond = torch.randn(B, N, K), torch.randn(B, N, K)
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool)
    kw = dict(tokens=tokens, masked=masked, num_to_mask=0, temperature=0.0, seed=0, step=0, backend=backend)
    for g in (0.0, 2.5, 10.0, -1.0):
        out, _ = run(cond, uncond, guidance_scale=g, **kw)
        assert torch.equal(out, (uncond + g * (cond - uncond)).argmax(-1)), g
        comparisons.add()
    # g = 1 (or no uncond) never reads the unconditional logits, not even NaNs
    out, _ = run(cond, torch.full_like(uncond, float("nan")), guidance_scale=1.0, **kw)
    assert torch.equal(out, cond.argmax(-1))
    comparisons.add()
    assert torch.equal(ref.guided_logits(cond, uncond, 3.0), uncond + torch.tensor(3.0) * (cond - uncond))


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_tokens_never_change_and_counts_are_clamped(backend, comparisons):
    B, N, K = 3, 64, 50
    logits, _, tokens, masked, _ = make_inputs(B, N, K, seed=5)
    masked[2] = False  # an image with nothing left to generate
    for num in (0, 5, N, torch.tensor([1, 60, 3]), torch.tensor([64, 0, 64], dtype=torch.int32)):
        out, stay = run(logits, tokens=tokens, masked=masked, num_to_mask=num, choice_temperature=1.0, seed=9,
                        step=2, backend=backend)
        assert torch.equal(out[~masked], tokens[~masked])
        assert not bool((stay & ~masked).any())
        want = torch.as_tensor(num).expand(B).clamp(max=N)
        assert torch.equal(stay.sum(1), torch.minimum(want.long(), masked.sum(1)))
        assert bool(((out >= 0) & (out < K)).all())
        comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowest_confidence_stays_masked(backend, comparisons):
    # no noise, tau = 0: confidence = log p of the argmax token, computable here
    B, N, K = 2, 40, 30
    logits = torch.randn(B, N, K) * torch.linspace(0.1, 5, N)[None, :, None]
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.rand(B, N) < 0.75
    _, stay = run(logits, tokens=tokens, masked=masked, num_to_mask=torch.tensor([4, 9]), temperature=0.0,
                  seed=0, step=0, backend=backend)
    conf = torch.log_softmax(logits, -1).amax(-1).masked_fill(~masked, float("inf"))
    for b, n in ((0, 4), (1, 9)):
        assert set(stay[b].nonzero().flatten().tolist()) == set(conf[b].argsort()[:n].tolist())
        comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_ties_go_to_lowest_position(backend, comparisons):
    B, N, K = 1, 12, 5
    logits = torch.zeros(B, N, K)  # every confidence is log(1/5): all tied
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool)
    masked[0, 1] = False
    _, stay = run(logits, tokens=tokens, masked=masked, num_to_mask=4, temperature=0.0, seed=0, step=0,
                  backend=backend)
    assert stay[0].nonzero().flatten().tolist() == [0, 2, 3, 4]
    comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prob_confidence_ranks_like_lucidrains(backend, comparisons):
    B, N, K = 1, 50, 40
    logits = torch.randn(B, N, K) * 3
    tokens, masked = torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool)
    out, stay = run(logits, tokens=tokens, masked=masked, num_to_mask=10, confidence="prob", temperature=1.0,
                    seed=11, step=5, backend=backend)
    scores = 1 - logits.softmax(-1).gather(-1, out[..., None])[..., 0]  # lucidrains' scores
    assert set(stay[0].nonzero().flatten().tolist()) == set(scores[0].topk(10).indices.tolist())
    comparisons.add()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_and_step_repeat_other_steps_differ(backend, comparisons):
    logits, uncond, tokens, masked, ntm = make_inputs(2, 64, 100, cfg=True, seed=1)
    kw = dict(tokens=tokens, masked=masked, num_to_mask=ntm, guidance_scale=2.0, choice_temperature=1.0,
              backend=backend)
    a = run(logits, uncond, seed=5, step=0, **kw)
    b = run(logits, uncond, seed=5, step=0, **kw)
    c = run(logits, uncond, seed=5, step=1, **kw)
    d = run(logits, uncond, seed=6, step=0, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    comparisons.add()


def _sampled_counts(backend, logits_row, temperature, top_k, batch, seq_len, steps):
    K = logits_row.numel()
    logits = logits_row.expand(batch, seq_len, K).contiguous()
    tokens, masked = torch.zeros(batch, seq_len, dtype=torch.long), torch.ones(batch, seq_len, dtype=torch.bool)
    counts = torch.zeros(K, dtype=torch.long)
    for step in range(steps):
        out, _ = run(logits, tokens=tokens, masked=masked, num_to_mask=0, temperature=temperature, top_k=top_k,
                     seed=1234, step=step, backend=backend)
        counts += torch.bincount(out.flatten(), minlength=K)
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.6, None), (1.3, 5)])
def test_sampled_frequencies_follow_softmax(backend, temperature, top_k, comparisons):
    """Chi-square goodness of fit of the sampled ids to softmax(l / tau) (restricted to the top
    k when filtered). False-alarm rate 1e-3 per case for a correct sampler; the seed is fixed,
    so the test is deterministic."""
    scipy_stats = pytest.importorskip("scipy.stats")
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5, 0.2, -3.0])
    batch, seq_len, steps = (8, 1024, 4)
    if device_of(backend) == "cpu" and backend == "triton":  # the interpreter is slow (its top-k bisection slower)
        batch, seq_len, steps = (2, 256, 3) if top_k else (4, 512, 3)
    counts = _sampled_counts(backend, row, temperature, top_k, batch, seq_len, steps)
    p = torch.softmax(row.double() / temperature, 0)
    if top_k is not None:
        keep = row >= row.topk(top_k).values[-1]
        assert int(counts[~keep].sum()) == 0
        p = torch.where(keep, p, 0.0)
        p, counts = p[keep] / p[keep].sum(), counts[keep]
    total = int(counts.sum())
    assert total == batch * seq_len * steps
    result = scipy_stats.chisquare(counts.double().numpy(), (p * total).numpy())
    assert result.pvalue > 1e-3, (counts.tolist(), (p * total).tolist())
    comparisons.add()


# -- NaN policy --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy(backend, comparisons):
    """NaN logits count as -inf (never sampled); a row without any usable logit gets token 0 and
    confidence -inf (it stays masked first); +inf is clamped to the largest float32; NaN at
    known positions is ignored; no NaN ever reaches the output."""
    B, N, K = 2, 20, 16
    logits = torch.randn(B, N, K)
    logits[0, 0, :] = float("nan")  # dead row
    logits[0, 1, ::2] = float("nan")  # half NaN: only odd tokens can be sampled
    logits[0, 2, 5] = float("inf")  # wins every draw
    logits[0, 3, :] = float("-inf")  # dead row too
    logits[1, 4, :] = float("nan")  # known position: ignored
    tokens = torch.full((B, N), 3, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    masked[1, 4] = False
    for tau in (0.0, 1.0, 2.0):
        out, stay = run(logits, tokens=tokens, masked=masked, num_to_mask=torch.tensor([2, 3]), temperature=tau,
                        choice_temperature=1.0, seed=4, step=0, backend=backend)
        assert int(out[0, 0]) == 0 and int(out[0, 3]) == 0
        assert int(out[0, 1]) % 2 == 1
        assert int(out[0, 2]) == 5
        assert int(out[1, 4]) == 3 and not bool(stay[1, 4])
        assert stay[0].nonzero().flatten().tolist() == [0, 3]  # the dead rows, lowest first
        comparisons.add()
    trace = ref.step_trace(logits, tokens=tokens, masked=masked, num_to_mask=torch.tensor([2, 3]), temperature=1.0,
                           choice_temperature=1.0, seed=4, step=0)
    assert not bool(torch.isnan(trace.confidence).any())
    assert float(trace.confidence[0, 0]) == float("-inf")


# -- dispatch and bad input --------------------------------------------------------------------

def test_dispatch_on_cpu():
    from musefast.ops.remask import CFG_SAMPLE_REMASK

    logits, _, tokens, masked, ntm = make_inputs(1, 4, 8)
    args = (logits, None, tokens, masked, ntm, 1.0, 1.0, 0.0, 0, "logprob", 0, 0)
    assert CFG_SAMPLE_REMASK.select(None, "cpu", *args).name == "cpu"
    assert ops.backends("cpu")["cfg_sample_remask"]["cpu"] == "ok"
    kw = dict(tokens=tokens, masked=masked, num_to_mask=ntm, seed=0, step=0)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.cfg_sample_remask(logits, backend="cuda", **kw)  # CPU tensors
    with pytest.raises(ValueError, match="unknown backend"):
        ops.cfg_sample_remask(logits, backend="nope", **kw)


def _good():
    logits, uncond, tokens, masked, _ = make_inputs(2, 8, 16, cfg=True)
    return dict(logits=logits, uncond_logits=uncond, tokens=tokens, masked=masked, num_to_mask=2, seed=0, step=0)


@pytest.mark.parametrize("change,error,match", [
    (dict(logits=torch.zeros(2, 8, 16, dtype=torch.long)), TypeError, "logits"),
    (dict(logits=torch.zeros(2, 8)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 8, 0), uncond_logits=None), ValueError, "K = 0"),
    (dict(uncond_logits=torch.zeros(2, 8, 15)), ValueError, "uncond_logits"),
    (dict(uncond_logits=torch.zeros(2, 8, 16, dtype=torch.float16)), TypeError, "uncond_logits"),
    (dict(uncond_logits=torch.zeros(2, 8, 16, device="meta")), ValueError, "uncond_logits"),
    (dict(tokens=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "tokens"),
    (dict(tokens=torch.zeros(2, 9, dtype=torch.long)), ValueError, "tokens"),
    (dict(tokens=torch.zeros(2, 8, dtype=torch.long, device="meta")), ValueError, "tokens"),
    (dict(masked=torch.ones(2, 8, dtype=torch.uint8)), TypeError, "masked"),
    (dict(masked=torch.ones(8, dtype=torch.bool)), ValueError, "masked"),
    (dict(num_to_mask=-1), ValueError, "num_to_mask"),
    (dict(num_to_mask=9), ValueError, "num_to_mask"),
    (dict(num_to_mask=torch.tensor([1, 9])), ValueError, "num_to_mask"),
    (dict(num_to_mask=torch.tensor([1, 2, 3])), ValueError, "num_to_mask"),
    (dict(num_to_mask=torch.tensor([1.0, 2.0])), TypeError, "num_to_mask"),
    (dict(num_to_mask=2.0), TypeError, "num_to_mask"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(choice_temperature=-1.0), ValueError, "choice_temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(confidence="p"), ValueError, "confidence"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=True), ValueError, "seed"),
    (dict(step=2**30), ValueError, "step"),
    (dict(step=1.5), ValueError, "step"),
], ids=lambda v: str(v)[:40] if not isinstance(v, type) else v.__name__)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])  # checked before dispatch: CPU tensors
def test_bad_input(change, error, match, backend):
    kw = _good()
    kw.update(change)
    logits, uncond = kw.pop("logits"), kw.pop("uncond_logits")
    with pytest.raises(error, match=match):
        ops.cfg_sample_remask(logits, uncond, backend=backend, **kw)


def test_empty_batch_and_sequence():
    for B, N in ((0, 5), (2, 0)):
        logits = torch.zeros(B, N, 4)
        out, stay = run(logits, tokens=torch.zeros(B, N, dtype=torch.long), masked=torch.ones(B, N, dtype=torch.bool),
                        num_to_mask=0, seed=0, step=0, backend="cpu")
        assert out.shape == (B, N) and stay.shape == (B, N)


def test_gumbel_range_constants_bound_the_noise():
    # the exact skip in the fast kernels relies on G in [-2.82, 16.64]
    g = philox.gumbel_from_uniform(torch.tensor([2.0**-24, 1 - 2.0**-24]))
    assert -2.8116 < float(g[0]) < -2.8115 and 16.635 < float(g[1]) < 16.6356
    assert math.isclose(float(g[1]) - float(g[0]), 19.447, abs_tol=1e-2)


def test_compiled_op_passes_opcheck():
    """Schema, fake-tensor (Meta) kernel and AOT dispatch of torch.ops.musefast.cfg_sample_remask."""
    from musefast import _build

    if _build.extension() is None:
        pytest.skip("musefast._C is not built")
    logits, uncond, tokens, masked, ntm = make_inputs(2, 5, 7, cfg=True)
    for args in ((logits, None, tokens, masked, ntm, 1.0, 1.0, 0.0, 0, False, 0, 0, 0),
                 (logits, uncond, tokens, masked, ntm, 3.0, 0.5, 1.0, 3, True, 5, 6, 7)):
        result = torch.library.opcheck(torch.ops.musefast.cfg_sample_remask.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


_TRITON_COMPILE_CHECK = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from musefast.kernels.remask import _remask_rows_kernel as fn

sig = dict(lc_ptr="*fp16", lu_ptr="*fp16", tokens_ptr="*i64", masked_ptr="*u8", out_tokens_ptr="*i64",
           conf_ptr="*fp32", R="i32", N="i32", K="i32", stride_cb="i32", stride_cn="i32", stride_ub="i32",
           stride_un="i32", guidance="fp32", inv_tau="fp32", choice_temperature="fp32", top_k="i32",
           seed_lo="i64", seed_hi="i32", c3_sample="i32", c3_choice="i32")
for cfg, top_k, prob in ((True, False, False), (False, True, True)):
    consts = dict(CFG=cfg, SAMPLE=True, TOP_K=top_k, CHOICE=True, PROB=prob, BLOCK_R=2, BLOCK_K=2048)
    s = {**sig, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=fn, signature=s, constexprs={(list(s).index(k),): v for k, v in consts.items()})
    for arch in (80, 90):
        triton.compile(src, target=GPUTarget("cuda", arch, 32))
print("compiled")
"""


def test_triton_kernel_compiles_for_gpus():
    """The interpreter is more permissive than the compiler: compile the kernel for
    sm_80 and sm_90 without a GPU (in a process without TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _TRITON_COMPILE_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's ptxas is unavailable")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
