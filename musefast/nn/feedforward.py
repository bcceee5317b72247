"""Feed-forward blocks and norms shared by the transformers."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from musefast.cpu import linear as cpu_linear

MLP_KINDS = ("gelu", "geglu")
NORM_KINDS = ("layernorm", "rmsnorm")
GELU_APPROXIMATIONS = ("none", "tanh")


class FeedForward(nn.Module):
    """``gelu``: Linear → GELU → Linear. ``geglu``: one Linear to [value; gate] (the layout of
    diffusers' GELU-gated projection: concat([linear, gate]) rows), value · GELU(gate) → Linear.
    ``inner_norm`` (optional module) normalises the hidden activations before the last Linear.
    ``gelu_approximate``: ``"none"`` (exact erf GELU) or ``"tanh"`` (the tanh approximation,
    ``jax.nn.gelu``'s default), as in ``F.gelu``."""

    def __init__(self, dim: int, hidden_dim: int, kind: str = "gelu", *, bias: bool = True,
                 inner_norm: nn.Module | None = None, gelu_approximate: str = "none"):
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"mlp kind must be one of {MLP_KINDS}, got {kind!r}")
        if gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu_approximate must be one of {GELU_APPROXIMATIONS}, got {gelu_approximate!r}")
        self.kind = kind
        self.gelu_approximate = gelu_approximate
        self.proj_in = nn.Linear(dim, hidden_dim * (2 if kind == "geglu" else 1), bias=bias)
        self.inner_norm = inner_norm
        self.proj_out = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``proj_out(act(proj_in(x)))``, plus ``residual`` when given (the block's skip: the CPU
        engine adds it inside the output projection's kernel)."""
        h = self.proj_in(x)
        if self.kind == "geglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * F.gelu(gate, approximate=self.gelu_approximate)
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        out = self.proj_out(h)
        return out if residual is None else residual + out


@cpu_linear.fused_forward(FeedForward)
def _cpu_forward(module: FeedForward, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """FeedForward on the CPU path: the GELU (gelu kind) or the GEGLU product (geglu kind) in the
    epilogue of the input projection: value · GELU(gate) = linear_mul(x, W_value, other=GELU-linear(x, W_gate));
    the block's ``residual`` (when given) added in the epilogue of the output projection."""
    proj_in = module.proj_in
    if not cpu_linear.runs_packed(proj_in, x) or module.gelu_approximate != "none":
        return type(module).forward(module, x, residual)
    if module.kind == "geglu":
        gate = cpu_linear.linear(proj_in, x, "gelu", part="gate")
        if torch.compiler.is_compiling():  # oneDNN's binary-epilogue op has no fake kernel to trace
            h = cpu_linear.linear(proj_in, x, part="value") * gate
        else:
            h = cpu_linear.linear_mul(proj_in, x, gate, part="value")
    else:
        h = cpu_linear.linear(proj_in, x, "gelu")
    if module.inner_norm is not None:
        h = module.inner_norm(h)
    return module.proj_out(h) if residual is None else cpu_linear.linear_add(module.proj_out, h, residual)


def make_norm(kind: str, dim: int, eps: float = 1e-6, *, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {kind!r}")
