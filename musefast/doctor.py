"""``musefast.doctor()``: what was built, which backends are usable, and why not."""
from __future__ import annotations

import platform

import torch


def _versions() -> list[str]:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton unavailable ({exc})")
    try:
        import flash_attn

        lines.append(f"flash-attn {flash_attn.__version__}")
    except Exception:
        lines.append("flash-attn not installed (optional)")
    if torch.cuda.is_available():
        lines.append(f"CUDA device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("CUDA device: none" + ("" if torch.version.cuda else " (CPU build of torch)"))
    return lines


def _build_lines(status: dict) -> list[str]:
    """One line per part of musefast._C: built how and in how long, or why not."""
    from musefast._build import arch_names

    if status["built"]:
        cpu = f"built {status['how']} in {status['seconds']:.1f}s; cpu isa {status['cpu_isa']}"
    else:
        cpu = f"NOT built: {status['error']}"
    if status["cuda_kernels"]:
        archs = f" for {arch_names(status['cuda_archs'])}" if status["cuda_archs"] else ""
        cuda = f"built {status['cuda_how']}{archs} in {status['cuda_seconds']:.1f}s"
    elif status["cuda_skipped"]:  # nothing was compiled, on purpose
        cuda = f"not compiled ({status['cuda_error']})"
    else:
        cuda = f"not built: {status['cuda_error']}"
    return [f"musefast._C CPU kernels: {cpu}", f"musefast._C CUDA kernels: {cuda}"]


def doctor() -> str:
    """A human-readable report; builds musefast._C first if it was not tried yet."""
    from musefast import _build
    from musefast.ops import backends

    status = _build.extension_status()
    out = ["musefast doctor", "==============="]
    out += _versions()
    out += _build_lines(status)
    from musefast.cpu import int8, isa as cpu_isa, linear as cpu_engine

    out.append(cpu_isa.reason())
    out += cpu_engine.describe()
    out += int8.describe()
    out.append(auto_order_table())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        out.append(f"backends for {device} tensors:")
        for op_name, table in backends(device).items():
            out.append(f"  {op_name}:")
            for name, verdict in table.items():
                out.append(f"    {name:<11} {verdict}")
    from musefast.ops import verdicts

    out.append("self-check of compiled backends: " + (
        "off (MUSEFAST_SELFCHECK=0)" if not verdicts.enabled() else
        f"on; verdicts in {verdicts.verdict_file()} (`musefast doctor --selftest` re-runs every check)"))
    return "\n".join(out)


def auto_order_table() -> str:
    """Which backends auto-selection tries, in order, per op and device type (first usable wins)."""
    from musefast.ops.registry import _OPS

    lines = ["auto-selection order (first usable backend wins):"]
    for name, the_op in _OPS.items():
        if the_op.probe is None:
            continue
        lines.append(f"  {name:<18} cuda: {' > '.join(the_op.auto_order('cuda'))}; "
                     f"cpu: {' > '.join(the_op.auto_order('cpu'))}")
    return "\n".join(lines)
