"""When does a fast backend's result *agree* with the reference? One answer per op, shared by the
per-device self-check (musefast.ops.selfcheck) and the test suite.

Each function returns ``None`` when the result agrees and otherwise one line saying where it
does not. The rules:
- vq_nearest: the distance at the chosen index equals the true minimum up to rounding (ties are
  legal); rows with NaN get index 0 and distance NaN.
- attention: the error against an fp32 reference is at most twice the error of the same
  computation done in the inputs' dtype (flash-attn's rule), plus a small eps; a query with all
  keys masked gets exact zeros.
- qk_norm_rope: attention's rule (no padding).
- rms_norm_modulate: the error against a float64 reference is at most twice the error of the
  reference run in the inputs' dtype, plus a small eps relative to the output's size.
- cfg_sample_remask: tokens and masks equal the reference's except at counted floating-point
  near-ties (< 1% of positions), and the number of positions left masked is exact.
"""
from __future__ import annotations

import torch

from musefast.reference import remask as remask_ref


def vq_disagreement(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, distances: torch.Tensor,
                    ref_indices: torch.Tensor, ref_distances: torch.Tensor, *, rel_tol: float = 1e-5) -> str | None:
    """z (N, D), codebook (K, D); a backend's (indices, distances) vs the reference's."""
    if indices.dtype != torch.int64 or tuple(indices.shape) != tuple(ref_indices.shape):
        return f"indices must be int64 of shape {tuple(ref_indices.shape)}, got {indices.dtype} {tuple(indices.shape)}"
    indices, distances = indices.cpu(), distances.cpu().float()
    ref_distances = ref_distances.cpu()
    nan_rows = torch.isnan(ref_distances)
    if bool((indices[nan_rows] != 0).any()) or not bool(torch.isnan(distances[nan_rows]).all()):
        return "a row with NaN must give index 0 and distance NaN"
    ok_rows = ~nan_rows
    if bool(((indices < 0) | (indices >= codebook.shape[0]))[ok_rows].any()):
        return "an index lies outside [0, K)"
    zd, cd = z.detach().cpu().double(), codebook.detach().cpu().double()
    chosen = (zd - cd[indices.clamp(0, codebook.shape[0] - 1)]).pow(2).sum(-1)
    scale = zd.pow(2).sum(-1) + cd.pow(2).sum(-1).max()
    excess = (chosen - ref_distances.double())[ok_rows]
    tol = (rel_tol * scale)[ok_rows]
    if bool((excess > tol).any()):
        row = int(torch.nonzero(excess > tol)[0])
        return f"{int((excess > tol).sum())} rows chose a code farther than the nearest (first excess {float(excess[row]):.3g})"
    reported = (distances - chosen.float())[ok_rows].abs()
    if bool((reported > tol.float() + 1e-6).any()):
        return "a returned distance is not the distance to the returned code"
    return None


def attention_disagreement(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None) -> str | None:
    """A backend's output vs the fp32 reference, with the same-dtype reference's error as the yardstick."""
    if tuple(out.shape) != tuple(ref_fp32.shape):
        return f"output shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    if out.dtype != ref_same_dtype.dtype:
        return f"output dtype {out.dtype} != input dtype {ref_same_dtype.dtype}"
    out32, ref32 = out.float(), ref_fp32.float()
    if not bool(torch.isfinite(out32).all()):
        return "output holds NaN or inf"
    if key_padding_mask is not None:
        dead = ~key_padding_mask.any(dim=-1)
        if bool(dead.any()) and bool((out32[dead] != 0).any()):
            return "a query whose keys are all masked must get zeros"
    err = float((out32 - ref32).abs().max()) if out.numel() else 0.0
    base = float((ref_same_dtype.float() - ref32).abs().max()) if out.numel() else 0.0
    eps = 1e-5 if out.dtype == torch.float32 else 1e-3
    if err > 2 * base + eps:
        return f"max error {err:.3g} vs the fp32 reference exceeds 2 x {base:.3g} (same-dtype reference) + {eps}"
    return None


def qk_norm_rope_disagreement(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor) -> str | None:
    """qk_norm_rope (q, k, v stacked): attention's rule without padding — the error against the fp32
    reference at most twice that of the reference run in the inputs' dtype, plus a small eps."""
    return attention_disagreement(out, ref_fp32, ref_same_dtype)


def rms_norm_disagreement(out: torch.Tensor, exact: torch.Tensor, ref_same_dtype: torch.Tensor) -> str | None:
    """rms_norm_modulate: a backend's output vs the float64 reference, with the same-dtype
    reference's error as the yardstick (the kernel sums in float32 in its own order)."""
    if tuple(out.shape) != tuple(exact.shape):
        return f"output shape {tuple(out.shape)} != {tuple(exact.shape)}"
    if out.dtype != ref_same_dtype.dtype:
        return f"output dtype {out.dtype} != input dtype {ref_same_dtype.dtype}"
    if not bool(torch.isfinite(out).all()):
        return "output holds NaN or inf"
    if not out.numel():
        return None
    exact = exact.double()
    err = float((out.double() - exact).abs().max())
    base = float((ref_same_dtype.double() - exact).abs().max())
    eps = (1e-5 if out.dtype == torch.float32 else 1e-3) * max(1.0, float(exact.abs().max()))
    if err > 2 * base + eps:
        return f"max error {err:.3g} vs the float64 reference exceeds 2 x {base:.3g} (same-dtype reference) + {eps:.3g}"
    return None


def remask_disagreement(trace: remask_ref.StepTrace, tokens: torch.Tensor, masked: torch.Tensor, *,
                        value_scale: float, num_to_mask: torch.Tensor) -> tuple[str | None, dict]:
    """A backend's (tokens, masked) vs the reference's step trace -> (why not | None, counts).

    A token may differ only where the reference's best and second-best Gumbel-max values are
    within a few float32 ulps (``margin``): FMA contraction and each library's exp/log round
    differently. A position's mask may differ only in an image whose selection boundary (the gap
    between the n-th and (n+1)-th lowest confidence) is that close, or where a token near-tie
    changed a confidence (then at most two positions per differing token move). Near-ties must
    stay rare (< 1% of positions), so the tolerance cannot hide a real bug.
    """
    tokens, masked = tokens.cpu(), masked.cpu()
    counts: dict = {}
    if tokens.dtype != torch.int64 or masked.dtype != torch.bool:
        return f"outputs must be int64 tokens and bool masked, got {tokens.dtype} and {masked.dtype}", counts
    if tokens.shape != trace.tokens.shape or masked.shape != trace.masked.shape:
        return f"output shapes {tuple(tokens.shape)}/{tuple(masked.shape)} != {tuple(trace.tokens.shape)}", counts
    tol_v = 4e-6 * value_scale
    token_diff = tokens != trace.tokens
    # Saturated values (inf, or max float32 that no addition moves) tie exactly on every
    # backend: the lowest index wins, no rounding can differ. Other ties within tol_v are near-ties.
    saturated = (trace.margin == 0) & (trace.best.abs() >= torch.finfo(torch.float32).max)
    near_v = (trace.margin <= tol_v) & ~saturated
    if bool((token_diff & ~near_v).any()):
        first = (token_diff & ~near_v).nonzero()[:5].tolist()
        return f"{int((token_diff & ~near_v).sum())} tokens differ away from near-ties (first at {first})", counts
    conf = trace.confidence
    finite = conf[torch.isfinite(conf)]
    tol_c = 4e-6 * (1.0 + (float(finite.abs().max()) if finite.numel() else 0.0))
    mask_diff = masked != trace.masked
    near_c = 0
    for b in range(conf.shape[0]):
        diff_b = int(mask_diff[b].sum())
        moved_tokens = int(token_diff[b].sum())
        if moved_tokens:
            if diff_b > 2 * moved_tokens:
                return f"image {b}: {diff_b} mask changes for {moved_tokens} token near-ties", counts
            continue
        values = torch.sort(conf[b][conf[b] != float("inf")]).values  # the input's masked positions
        n = int(trace.masked[b].sum())
        if 0 < n < values.numel() and float(values[n] - values[n - 1]) <= tol_c:
            near_c += 1
            lo, hi = float(values[n - 1]), float(values[n])
            near_pos = (conf[b] >= lo - tol_c) & (conf[b] <= hi + tol_c)
            if bool((mask_diff[b] & ~near_pos).any()):
                return f"image {b}: mask differs away from the selection boundary", counts
        elif diff_b:
            return f"image {b}: {diff_b} positions differ with a clear selection boundary", counts
    positions = tokens.numel()
    near_total = int(near_v[trace.margin != float("inf")].sum()) + near_c
    counts = {"near_ties": near_total, "token_mismatches": int(token_diff.sum()),
              "mask_mismatches": int(mask_diff.sum())}
    if near_total > max(2, positions // 100):
        return f"{near_total} near-ties among {positions} positions (more than 1%)", counts
    masked_in = (conf != float("inf")).sum(1)
    expected_stay = torch.minimum(num_to_mask.cpu().clamp(min=0), masked_in)
    if not torch.equal(masked.sum(1), expected_stay):
        return f"positions left masked per image {masked.sum(1).tolist()} != {expected_stay.tolist()}", counts
    return None, counts
