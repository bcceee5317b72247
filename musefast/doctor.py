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


def doctor() -> str:
    """A human-readable report; builds musefast._C first if it was not tried yet."""
    from musefast import _build
    from musefast.ops import backends

    status = _build.extension_status()
    out = ["musefast doctor", "==============="]
    out += _versions()
    if status["built"]:
        out.append(
            f"musefast._C: built {status['how']} in {status['seconds']:.1f}s; "
            f"cpu isa {status['cpu_isa']}; cuda kernels {'yes' if status['cuda_kernels'] else 'no'}"
        )
        if not status["cuda_kernels"]:
            out.append(f"  cuda kernels not compiled: {_build.cuda_unavailable_reason()}")
    else:
        out.append(f"musefast._C: NOT built: {status['error']}")
    from musefast.engine import cpu as cpu_engine

    out += cpu_engine.describe()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        out.append(f"backends for {device} tensors:")
        for op_name, table in backends(device).items():
            out.append(f"  {op_name}:")
            for name, verdict in table.items():
                out.append(f"    {name:<11} {verdict}")
    return "\n".join(out)
