"""Which CPU path runs here: what the CPU offers, capped by what oneDNN is allowed to use.

oneDNN reads ``ONEDNN_MAX_CPU_ISA`` (legacy name ``DNNL_MAX_CPU_ISA``, case-insensitive) once, at
its first use, and never dispatches above it: an AVX-512 machine run with ``ONEDNN_MAX_CPU_ISA=AVX2``
behaves, for every oneDNN kernel, like an AVX2-only CPU. So the decisions below use the *effective*
instruction set — the CPU's flags intersected with the cap — never the flags alone:

* ``avx512-amx`` / ``avx512-bf16``: native bf16 dot products; ``dtype="auto"`` picks bfloat16;
* ``avx512``: oneDNN takes bf16 weights but emulates the products (``auto`` picks float32);
* ``avx2``: oneDNN has no bf16 kernels at all (packing a bf16 weight raises), so a bf16 or fp16
  model runs on float32-packed weights — its values widened exactly, inputs and outputs kept in
  the model's dtype;
* ``none`` (below AVX2, or not x86): the plain PyTorch path, no packing.

int8 needs VNNI in the effective set: without it oneDNN's u8·s8 products saturate their 16-bit
pair sums, and the results are silently wrong (measured: 0.5 max error on outputs of 2.3 under
``ONEDNN_MAX_CPU_ISA=AVX2`` or ``AVX512_CORE``, 1e-6 against the reference with VNNI).
"""
from __future__ import annotations

import functools
import os
import platform

import torch

# Flags that change a decision of the CPU path (recorded by benchmarks beside their figures).
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "avx_ne_convert", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})

# What each oneDNN cap lets it use, as CPU flags (oneDNN's ISA names; an unknown name is no cap).
_AVX2 = frozenset({"avx2", "fma"})
_AVX512 = _AVX2 | _AVX512_CORE
_AVX512_BF16 = _AVX512 | {"avx512_vnni", "avx512_bf16"}
_AVX512_FP16 = _AVX512_BF16 | {"avx512_fp16", "avx_vnni", "avx_ne_convert"}
_AMX = _AVX512_FP16 | {"amx_tile", "amx_bf16", "amx_int8"}
CAPS = {
    "SSE41": frozenset(), "AVX": frozenset(), "AVX2": _AVX2,
    "AVX2_VNNI": _AVX2 | {"avx_vnni"}, "AVX2_VNNI_2": _AVX2 | {"avx_vnni", "avx_ne_convert"},
    "AVX512_CORE": _AVX512, "AVX512_CORE_VNNI": _AVX512 | {"avx512_vnni"}, "AVX512_CORE_BF16": _AVX512_BF16,
    "AVX512_CORE_FP16": _AVX512_FP16, "AVX10_1_512": _AVX512_FP16,
    "AVX512_CORE_AMX": _AMX, "AVX10_1_512_AMX": _AMX, "AVX512_CORE_AMX_FP16": _AMX, "AVX10_1_512_AMX_FP16": _AMX,
    "AVX10_2_512": _AVX512_FP16, "AVX10_2_512_AMX_2": _AMX,
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onednn_cap() -> str | None:
    """The oneDNN ISA cap in effect for this process (upper case), or None: no cap, or a value
    oneDNN does not know (it ignores those)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    value = value.strip().upper()
    return value if value in CAPS else None


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@functools.lru_cache(maxsize=1)
def effective() -> dict:
    """What oneDNN may use here: the CPU's flags within the cap. Keys: ``avx2``, ``avx512``
    (F/BW/VL/DQ), ``vnni`` (int8 dot products), ``bf16`` (native bf16 dot products), ``amx``,
    ``bf16_packs`` (oneDNN accepts bf16 weights at all), ``onednn``, ``cap``, ``path``."""
    flags = cpu_flags() if _is_x86() else frozenset()
    cap = onednn_cap()
    if cap is not None:
        flags = flags & CAPS[cap]
    onednn = torch.backends.mkldnn.is_available()
    avx2 = "avx2" in flags
    avx512 = _AVX512_CORE <= flags
    amx = bool({"amx_bf16", "amx_int8"} & flags)
    bf16 = (avx512 and "avx512_bf16" in flags) or "amx_bf16" in flags
    vnni = (avx512 and "avx512_vnni" in flags) or (avx2 and "avx_vnni" in flags) or "amx_int8" in flags
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # asks oneDNN itself: cap-aware
    bf16_packs = onednn and (bool(probe()) if probe is not None else avx512 or "avx_ne_convert" in flags)
    if not (onednn and avx2):
        path = "none"
    elif amx:
        path = "avx512-amx"
    elif bf16:
        path = "avx512-bf16"
    elif avx512:
        path = "avx512"
    else:
        path = "avx2"
    return dict(avx2=avx2, avx512=avx512, vnni=vnni, bf16=bf16, amx=amx, bf16_packs=bf16_packs, onednn=onednn,
                cap=cap, path=path)


def record() -> dict:
    """The ISA facts a measurement depends on, for result files: CPU model, the flags that
    matter, the caps of oneDNN / MKL / ATen in effect, and the path taken."""
    flags = cpu_flags()
    eff = effective()
    return {
        "cpu_model": cpu_model(),
        "flags": [f for f in RELEVANT_FLAGS if f in flags],
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "ATEN_CPU_CAPABILITY": torch.backends.cpu.get_cpu_capability(),
        "musefast_cpu_path": eff["path"],
        "onednn_bf16": eff["bf16_packs"], "native_bf16": eff["bf16"], "vnni": eff["vnni"],
    }


def reason() -> str:
    """One line for ``doctor``: which CPU path runs, and why."""
    eff = effective()
    cap = f"oneDNN capped at {eff['cap']} (ONEDNN_MAX_CPU_ISA)" if eff["cap"] else "no oneDNN cap"
    int8 = "int8 available (VNNI)" if eff["vnni"] else "int8 refused (no VNNI within the cap)"
    if eff["path"] == "none":
        why = "this torch has no oneDNN" if not eff["onednn"] else "no AVX2 within the cap (or not x86)"
        return f"cpu path: none — plain PyTorch, nothing packed ({why}; {cap})"
    what = {
        "avx512-amx": "packed fp32/bf16 linears, bf16 on AMX tiles; dtype='auto' -> bfloat16",
        "avx512-bf16": "packed fp32/bf16 linears, native AVX512-BF16 products; dtype='auto' -> bfloat16",
        "avx512": "packed fp32/bf16 linears, bf16 emulated (no AVX512-BF16); dtype='auto' -> float32",
        "avx2": "packed fp32 linears; bf16/fp16 models run on fp32-packed weights (oneDNN has no bf16 "
                "kernels below AVX-512); dtype='auto' -> float32",
    }[eff["path"]]
    return f"cpu path: {eff['path']} — {what}; {int8} ({cap})"
