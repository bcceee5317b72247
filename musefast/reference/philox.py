"""Philox4x32-10 in PyTorch integer ops: the counter-based RNG of the decoding step.

Every backend of ``cfg_sample_remask`` (reference, C++, CUDA, Triton) draws its noise from
this generator with the same counter layout, so a fixed ``(seed, step)`` gives the same bits
everywhere. Philox4x32-10 is Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"
(SC 2011); the known-answer vectors of its Random123 distribution are checked in the tests.

Counter layout (the one definition; csrc/philox.h and musefast/kernels/remask.py follow it):

* key   = (seed mod 2**32, seed >> 32)                 seed: an int in [0, 2**64)
* ctr0  = group   (k // 4 for the sampling stream; 0 for the choice stream)
* ctr1  = n       (position in the image, 0 <= n < 2**32)
* ctr2  = b       (image in the batch, 0 <= b < 2**32)
* ctr3  = (stream << 30) | step                         step: an int in [0, 2**30)
* stream 0 (``STREAM_SAMPLE``): Gumbel noise of token k at (b, n) is output word k % 4 of the
  call with ctr0 = k // 4;  stream 1 (``STREAM_CHOICE``): the confidence noise of (b, n) is
  output word 0 of the call with ctr0 = 0.

Bits to floats, exactly reproducible everywhere (only exact float32 operations):
``u = ((x >> 9) * 2 + 1) * 2**-24`` is the midpoint of one of 2**23 equal cells of (0, 1),
so ``2**-24 <= u <= 1 - 2**-24``: never 0 or 1. The Gumbel variate is
``g = -log(-log(u))`` in float32; it is finite (|g| < 17) for every u. ``log`` itself may differ
by an ulp between math libraries: that is a floating-point near-tie, counted by the tests.

Integer arithmetic here uses int64 tensors holding values < 2**32; the 32×32-bit products
are split in 16-bit halves so that no intermediate overflows int64.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

MASK32 = 0xFFFFFFFF
STREAM_SAMPLE = 0
STREAM_CHOICE = 1
STEP_LIMIT = 1 << 30
SEED_LIMIT = 1 << 64


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * m, a an int64 tensor < 2**32."""
    p_lo = a * (m & 0xFFFF)  # < 2**48
    p_hi = a * (m >> 16)  # < 2**48
    t = p_hi + (p_lo >> 16)  # < 2**49: the product >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return t >> 16, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32-``rounds`` of counters (c0, c1, c2, c3) (int64 tensors with values < 2**32,
    broadcastable) under key (k0, k1) -> the four 32-bit output words as int64 tensors."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key of a seed in [0, 2**64)."""
    return seed & MASK32, (seed >> 32) & MASK32


def counter_word3(stream: int, step: int) -> int:
    return (stream << 30) | step


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """32-bit words (int64 tensor) -> float32 uniforms in [2**-24, 1 - 2**-24], exactly."""
    return (((x >> 9) * 2 + 1).to(torch.float32)) * (2.0**-24)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel variates -log(-log(u)) in float32."""
    return -torch.log(-torch.log(u))


def sample_stream_bits(seed: int, step: int, batch: torch.Tensor, pos: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Stream-0 words for images ``batch`` and positions ``pos`` (broadcast to (R,)), all K
    tokens -> int64 (R, K)."""
    k0, k1 = split_seed(seed)
    groups = torch.arange((num_classes + 3) // 4, dtype=torch.int64, device=pos.device)
    words = philox4x32(
        groups[None, :], pos[:, None], batch[:, None], counter_word3(STREAM_SAMPLE, step), k0, k1
    )
    # word j of group g belongs to token 4g + j
    return torch.stack(words, dim=-1).reshape(pos.shape[0], -1)[:, :num_classes]


def sample_gumbel(seed: int, step: int, batch: torch.Tensor, pos: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Gumbel noise of the token-sampling stream -> float32 (R, K)."""
    return gumbel_from_uniform(uniform_from_bits(sample_stream_bits(seed, step, batch, pos, num_classes)))


def choice_gumbel(seed: int, step: int, batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """Gumbel noise of the confidence (choice) stream -> float32 (B, N)."""
    k0, k1 = split_seed(seed)
    b = torch.arange(batch_size, dtype=torch.int64, device=device)[:, None]
    n = torch.arange(seq_len, dtype=torch.int64, device=device)[None, :]
    word0 = philox4x32(0, n, b, counter_word3(STREAM_CHOICE, step), k0, k1)[0]
    return gumbel_from_uniform(uniform_from_bits(word0))
