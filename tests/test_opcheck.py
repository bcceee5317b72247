"""``torch.library.opcheck`` for every C++ op of musefast._C (torchao's gate): the schema matches
what the kernel does (no hidden mutation or aliasing), autograd is registered correctly (none:
the ops refuse to be differentiated rather than silently give no gradient), the Meta kernel gives
the shapes, dtypes and strides of the real one, and AOT dispatch traces it with dynamic shapes.

Each op runs on its CPU kernel here (``cuda`` too, where a GPU and the CUDA part are built); a
test is skipped, with the reason, only where the op is not built."""
import pytest
import torch

from musefast.ops import _availability as avail


def _rms_norm_modulate(device):
    x = torch.randn(2, 5, 24, device=device)
    return [(x, torch.randn(2, 24, device=device), torch.randn(2, 24, device=device), 1e-6),
            (x.bfloat16(), torch.randn(1, 24, device=device).bfloat16(), None, 1e-5),
            (x[:, :, :16], None, None, 1e-6)]  # strided rows


def _vq_nearest(device):
    z, codebook = torch.randn(37, 16, device=device), torch.randn(50, 16, device=device)
    return [(z, codebook), (z.half(), codebook.half()), (torch.randn(16, 37, device=device).T[:, :16], codebook)]


def _qk_norm_rope(device):
    H, D = 2, 8
    streams = [torch.randn(2, 3, 3 * H * D, device=device), torch.randn(2, 5, 3 * H * D, device=device)]
    w = [torch.ones(D, device=device) + 0.1 * torch.randn(D, device=device) for _ in range(4)]
    tables = torch.rand(8, D // 2, device=device), torch.rand(8, D // 2, device=device)
    return [(streams, w[:2], w[2:], *tables, H, 1e-6),
            ([streams[1].bfloat16()], [w[0].bfloat16()], [w[1].bfloat16()], tables[0][:5], tables[1][:5], H, 1e-6)]


def _cfg_sample_remask(device):
    B, N, K = 2, 6, 9
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    masked = torch.ones(B, N, dtype=torch.bool, device=device)
    num_to_mask = torch.tensor([2, 3], device=device)
    logits = torch.randn(B, N, K, device=device)
    return [(logits, None, tokens, masked, num_to_mask, 1.0, 1.0, 4.5, 0, False, 5, 0, 1),
            (logits, torch.randn(B, N, K, device=device), tokens, masked, num_to_mask, 3.0, 0.0, 0.0, 4, True, 7, 1, 0)]


OPS = {"rms_norm_modulate": _rms_norm_modulate, "vq_nearest": _vq_nearest, "qk_norm_rope": _qk_norm_rope,
       "cfg_sample_remask": _cfg_sample_remask}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _has_kernel(name: str, device: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"musefast::{name}", device.upper())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name, device):
    reasons = avail.extension_reasons(name, device)
    if reasons:
        pytest.skip(f"musefast::{name} is not built for {device}: {'; '.join(reasons)}")
    if not _has_kernel(name, device):
        pytest.skip(f"musefast::{name} has no {device} kernel (a CPU-only op)")
    op = getattr(torch.ops.musefast, name).default
    for args in OPS[name](device):
        torch.library.opcheck(op, args)


def test_every_cpp_op_is_checked():
    """A new op registered in csrc/ must get its inputs here (else this gate would skip it)."""
    if avail.extension_reasons("vq_nearest", "cpu"):
        pytest.skip("musefast._C is not built")
    defined = {name.split("::", 1)[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("musefast::")}
    assert defined == set(OPS), f"ops of musefast._C without an opcheck case: {sorted(defined - set(OPS))}"
