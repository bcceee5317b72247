"""Trust is earned, per device: the checks.

Before a compiled backend (our C++, CUDA or Triton code: ``compiled=True`` in the registry) is
first auto-selected on a device, it is run on small awkward inputs (odd sizes, padding, all-masked
rows, ties, strided views, NaN rows) and compared with the reference by the rules of
:mod:`musefast.reference.agreement`. A backend that disagrees is skipped on that device: one
warning, the next backend runs, and ``musefast doctor`` shows why. The verdicts are kept per
device and build by :mod:`musefast.ops.verdicts`; ``MUSEFAST_SELFCHECK=0`` skips the checks and
``musefast doctor --selftest`` re-runs every one.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from musefast.ops.attention import attention
from musefast.ops.registry import _OPS, BackendUnavailableError, op
from musefast.ops.remask import cfg_sample_remask
from musefast.ops.rms_norm import rms_norm_modulate
from musefast.ops.rope import qk_norm_rope
from musefast.ops.verdicts import BackendCrashed, device_key, run_check
from musefast.ops.vq import vq_nearest
from musefast.reference import agreement
from musefast.reference import remask as ref_remask
from musefast.reference import rms_norm as ref_rms_norm
from musefast.reference.rope import rope_angles

# -- the checks: small awkward inputs per op ------------------------------------------------

@dataclass
class Case:
    label: str
    args: tuple
    kwargs: dict


def _try(call, case: Case, backend: str):
    """The backend's output, or None when it declines these inputs by its own reasons (a dtype
    it does not take): such cases are skipped, not failed. Call after the reference ran on the
    same case, so an exception here is the backend's fault, not the check's."""
    try:
        return call(*case.args, **case.kwargs, backend=backend)
    except BackendUnavailableError:
        return None
    except Exception as exc:
        text = str(exc).strip()
        raise BackendCrashed(f"{case.label}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}") from exc


def _vq_cases(device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(1234)
    codebook = torch.randn(1000, 59, generator=g)
    z = torch.randn(97, 59, generator=g)
    z[:10] = codebook[100:110]  # self-match: must return its own index (a real fused-argmin bug elsewhere)
    z[13, 7] = float("nan")  # NaN row: index 0, distance NaN
    strided = torch.randn(59, 33, generator=g).T  # non-contiguous rows
    small = torch.randn(5, 8, generator=g)
    cases = [Case("odd sizes, self-match, NaN row", (z, codebook), {}),
             Case("strided z", (strided, codebook), {}),
             Case("K=1", (small, torch.randn(1, 8, generator=g)), {}),
             Case("D=80 fp16", (torch.randn(41, 80, generator=g).half(), torch.randn(300, 80, generator=g).half()), {})]
    return [Case(c.label, tuple(a.to(device) for a in c.args), c.kwargs) for c in cases]


def check_vq_nearest(backend: str, device: torch.device) -> str | None:
    ran = 0
    for case in _vq_cases(device):
        call = functools.partial(vq_nearest, return_distance=True)
        z, codebook = case.args
        ref_idx, ref_dist = call(z, codebook, backend="reference")
        out = _try(call, case, backend)
        if out is None:
            continue
        idx, dist = out
        rel_tol = 1e-5 if z.dtype == torch.float32 else 2e-3
        why = agreement.vq_disagreement(z.reshape(-1, z.shape[-1]), codebook, idx, dist, ref_idx, ref_dist,
                                        rel_tol=rel_tol)
        if why is None and case.label.startswith("odd sizes") and not torch.equal(idx[:10].cpu(), torch.arange(100, 110)):
            why = "a vector equal to a code did not return that code's index"
        if why is not None:
            return f"{case.label}: {why}"
        ran += 1
    return None if ran else "no check case could run on this backend"


def _attention_cases(device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(99)
    B, H, Lq, Lk, D = 2, 3, 37, 19, 40
    q = torch.randn(B, Lq, H, D, generator=g).transpose(1, 2)  # (B, H, Lq, D) view of (B, L, H, D)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    mask = torch.rand(B, Lk, generator=g) < 0.6
    mask[1] = False  # every key masked: the queries get zeros
    x = torch.randn(1, 2, 33, 64, generator=g)
    cases = [Case("cross, padded, all-masked row, strided q", (q, k, v), {"key_padding_mask": mask}),
             Case("self, no mask, D=64", (x, x * 0.5, -x), {}),
             Case("fp16, padded", (q.half(), k.half(), v.half()), {"key_padding_mask": mask}),
             # bf16: the CPU's `bmm` backend (and GPUs); its scores must not be rounded to bf16
             Case("bf16, padded, strided q", (q.bfloat16(), k.bfloat16(), v.bfloat16()), {"key_padding_mask": mask})]
    return [Case(c.label, tuple(a.to(device) for a in c.args),
                 {n: t.to(device) for n, t in c.kwargs.items()}) for c in cases]


def check_attention(backend: str, device: torch.device) -> str | None:
    ran = 0
    for case in _attention_cases(device):
        ref32 = attention(*(a.float() for a in case.args), **case.kwargs, backend="reference")
        ref_same = attention(*case.args, **case.kwargs, backend="reference")
        out = _try(attention, case, backend)
        if out is None:
            continue
        why = agreement.attention_disagreement(out, ref32, ref_same, case.kwargs.get("key_padding_mask"))
        if why is not None:
            return f"{case.label}: {why}"
        ran += 1
    return None if ran else "no check case could run on this backend"


def _remask_cases(device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(7)
    B, N, K = 3, 37, 50
    both = 2.0 * torch.randn(2 * B, N, K, generator=g)
    cond, uncond = both.chunk(2)  # the CFG batch's halves: views with an offset
    transposed = (2.0 * torch.randn(B, K, N, generator=g)).transpose(1, 2)  # (B, N, K) from a (B, K, H·W) head
    tokens = torch.randint(0, K, (B, N), generator=g)
    masked = torch.rand(B, N, generator=g) < 0.7
    masked[2] = True  # an image with everything still masked
    num_to_mask = torch.tensor([30, 0, 20])  # more than are masked (clamped), none, some
    special = transposed.clone()
    special[0, 3] = float("nan")  # a NaN row: token 0, first to stay masked
    special[1, 4, :] = float("-inf")
    special[1, 5, 10:13] = 7.0  # an exact tie at the maximum: lowest index wins at temperature 0
    common = {"tokens": tokens, "masked": masked, "num_to_mask": num_to_mask}
    cases = [
        Case("CFG halves, top-k, choice noise", (cond, uncond),
             {**common, "guidance_scale": 3.0, "temperature": 1.0, "choice_temperature": 4.5, "top_k": 7, "seed": 11, "step": 2}),
        Case("strided logits, NaN/-inf rows, ties, argmax", (special, None),
             {**common, "temperature": 0.0, "choice_temperature": 0.0, "seed": 3, "step": 0}),
        Case("extreme temperatures", (transposed * 30, None),
             {**common, "temperature": 1e-3, "choice_temperature": 50.0, "seed": 2**63 + 5, "step": 9}),
        Case("hot sampling, prob confidence, fp16", (cond.half(), uncond.half()),
             {**common, "guidance_scale": 0.5, "temperature": 50.0, "confidence": "prob", "seed": 5, "step": 1}),
    ]
    moved = []
    for c in cases:
        args = tuple(None if a is None else a.to(device) for a in c.args)
        kwargs = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in c.kwargs.items()}
        moved.append(Case(c.label, args, kwargs))
    return moved


def check_cfg_sample_remask(backend: str, device: torch.device) -> str | None:
    ran = 0
    for case in _remask_cases(device):
        cfg_sample_remask(*case.args, **case.kwargs, backend="reference")  # validates the case
        logits, uncond = (None if a is None else a.cpu() for a in case.args)
        kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in case.kwargs.items()}
        kw.setdefault("guidance_scale", 1.0)
        trace = ref_remask.step_trace(logits, uncond if kw["guidance_scale"] != 1.0 else None, **kw)
        out = _try(cfg_sample_remask, case, backend)
        if out is None:
            continue
        tokens, masked = out
        finite = trace.best[torch.isfinite(trace.best)]
        value_scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
        why, _ = agreement.remask_disagreement(trace, tokens, masked, value_scale=value_scale,
                                               num_to_mask=kw["num_to_mask"])
        if why is not None:
            return f"{case.label}: {why}"
        ran += 1
    return None if ran else "no check case could run on this backend"


def _rope_cases(device: torch.device) -> list[Case]:
    def tables(ids, axes):  # half-width (L, D/2) float32 (cos, sin), as musefast.nn.rope builds them
        angles = rope_angles(ids, axes)
        return angles.cos().float(), angles.sin().float()

    g = torch.Generator().manual_seed(17)
    H, D, text, image = 3, 12, 5, 13
    ids = torch.zeros(text + image, 3)
    ids[text:, 1], ids[text:, 2] = torch.arange(image) // 4, torch.arange(image) % 4
    wide = torch.randn(2, image, 3 * H * D + 7, generator=g)[..., : 3 * H * D]  # a split of a wider matmul
    weights = [1 + 0.5 * torch.randn(D, generator=g) for _ in range(4)]
    streams = ([torch.randn(2, text, 3 * H * D, generator=g), wide], weights[:2], weights[2:])
    transposed = torch.randn(1, 3 * 2 * 16, 7, generator=g).transpose(1, 2)  # stride 1 along L, not channels
    cases = [Case("two streams, odd lengths, strided rows, D/2=6", (*streams, *tables(ids, (4, 4, 4))), {"heads": H}),
             Case("bf16, weights in bf16", ([wide[:1, :7].bfloat16()], [w.bfloat16() for w in weights[:1]],
                                            [w.bfloat16() for w in weights[1:2]], *tables(ids[:7], (4, 4, 4))), {"heads": H}),
             Case("fp16, channel stride != 1", ([transposed.half()], [torch.ones(16)], [weights[0][:4].repeat(4)],
                                                *tables(ids[:7], (4, 6, 6))), {"heads": 2})]

    def move(a):
        return [t.to(device) for t in a] if isinstance(a, list) else a.to(device)

    return [Case(c.label, tuple(move(a) for a in c.args), c.kwargs) for c in cases]


def check_qk_norm_rope(backend: str, device: torch.device) -> str | None:
    ran = 0
    for case in _rope_cases(device):
        qkv, *rest = case.args
        ref32 = torch.stack(qk_norm_rope([x.float() for x in qkv], *rest, **case.kwargs, backend="reference"))
        ref_same = torch.stack(qk_norm_rope(*case.args, **case.kwargs, backend="reference"))
        out = _try(qk_norm_rope, case, backend)
        if out is None:
            continue
        why = agreement.qk_norm_rope_disagreement(torch.stack(out), ref32, ref_same)
        if why is not None:
            return f"{case.label}: {why}"
        ran += 1
    return None if ran else "no check case could run on this backend"


def _rms_norm_cases(device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(23)
    x = 3 * torch.randn(3, 17, 40, generator=g) + 0.5
    scale, shift = 1 + torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    wide = torch.randn(2, 33, 770, generator=g)[..., 1:769]  # rows of a wider tensor: strided
    cases = [Case("odd sizes, per-image scale and shift", (x, 1e-6, scale, shift), {}),
             Case("strided rows, one shared scale (a plain RMSNorm)", (wide, 1e-5, 1 + torch.randn(1, 768, generator=g),
                                                                        None), {}),
             Case("bf16, shift only", (x.bfloat16(), 1e-6, None, shift.bfloat16()), {}),
             Case("bf16, large values, eps=None", (100 * x.bfloat16(), None, scale.bfloat16(), shift.bfloat16()), {})]
    return [Case(c.label, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in c.args), c.kwargs)
            for c in cases]


def check_rms_norm_modulate(backend: str, device: torch.device) -> str | None:
    ran = 0
    for case in _rms_norm_cases(device):
        x, eps, *mods = case.args
        eps64 = torch.finfo(x.dtype).eps if eps is None else eps  # the dtype's eps, as the backends use
        exact = ref_rms_norm.rms_norm_modulate(x.double(), eps64, *(None if m is None else m.double() for m in mods))
        ref_same = rms_norm_modulate(*case.args, backend="reference")
        out = _try(rms_norm_modulate, case, backend)
        if out is None:
            continue
        why = agreement.rms_norm_disagreement(out, exact, ref_same)
        if why is not None:
            return f"{case.label}: {why}"
        ran += 1
    return None if ran else "no check case could run on this backend"


CHECKS = {"vq_nearest": check_vq_nearest, "attention": check_attention, "cfg_sample_remask": check_cfg_sample_remask,
          "qk_norm_rope": check_qk_norm_rope, "rms_norm_modulate": check_rms_norm_modulate}


def install() -> None:
    """Give the public ops their checks (called once by musefast.ops)."""
    for name, check in CHECKS.items():
        op(name).check = check


@dataclass
class Result:
    op: str
    backend: str
    status: str  # "pass" | "FAIL" | "skip"
    detail: str
    seconds: float  # CPU time of the check


def selftest(device: str | torch.device | None = None, progress=None) -> list[Result]:
    """Run every check of every backend usable on ``device`` now (verdicts re-recorded).

    The reference defines the result and is not checked against itself; backends that cannot run
    on the device are reported as skipped with their reasons. ``progress(result)`` is called as
    each result comes: a first run on a GPU compiles every kernel, and a caller can show each
    line then instead of all of them at the end."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for name, the_op in _OPS.items():
        if the_op.check is None or the_op.probe is None:
            continue
        args, kwargs = the_op.probe(device)
        for backend, b in the_op.backends.items():
            if backend == "reference":
                continue
            reasons = b.reasons(*args, **kwargs)
            if reasons:
                results.append(Result(name, backend, "skip", "; ".join(reasons), 0.0))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    verdict = run_check(the_op, backend, device)
                results.append(Result(name, backend, "pass" if verdict["ok"] else "FAIL", verdict["why"],
                                      verdict["seconds"]))
            if progress is not None:
                progress(results[-1])
    return results


def format_header(device) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return f"musefast self-test on {device_key(device)}"


def format_result(r: Result) -> str:
    detail = f" ({r.detail})" if r.detail else ""
    return f"  {r.status:<4} {r.op:<18} {r.backend:<11} {r.seconds:6.2f}s{detail}"


def format_results(results: list[Result], device) -> str:
    lines = [format_header(device)] + [format_result(r) for r in results]
    failed = sum(r.status == "FAIL" for r in results)
    lines.append(f"{sum(r.status == 'pass' for r in results)} passed, {failed} failed, "
                 f"{sum(r.status == 'skip' for r in results)} skipped")
    return "\n".join(lines)
