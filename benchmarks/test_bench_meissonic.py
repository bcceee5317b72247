"""Meissonic: the transformer forward and the per-step work at 1024², in the same run as anchors.

* ``test_forward``: GPU — MeissonFlow/Meissonic's architecture (1.0 B parameters, random
  weights, bf16) at 1024² (64x64 tokens -> 32x32 in the transformer, 77 text tokens), batch 2
  (CFG); CPU — a reduced model (2 + 2 blocks, 128 wide, 16x16 tokens, fp32, batch 2). Anchor:
  the peer's ``Transformer2DModel`` on the same weights when it is importable (its ``src/`` on
  ``MEISSONIC_PEER_SRC`` and diffusers 0.32.x: it breaks on newer diffusers), else none. The
  real-size CPU comparison with the peer in its own environment is
  ``benchmarks/meissonic_forward.py`` (results in benchmarks/results/meissonic-cpu-*.json).
* ``test_step_at_1024``: the sampling work of one step of one 1024² image under CFG at full size
  on every device: ``cfg_sample_remask`` over 2 x 4096 x 8192 logits, anchor the peer scheduler's
  step (an AmusedScheduler copy, reproduced op for op by ``AmusedCompatSampler``; GPU only: on
  two CPU cores it takes ~9 s a call). Records the logits' memory.
* ``test_vq_nearest_at_1024``: VQ encode of a 1024² image: 4096 latents x 8192 codes x 64, anchor
  cdist + argmin.
"""
import os
import sys

import torch

from musefast import ops
from musefast.compat.amused_scheduler import AmusedCompatSampler
from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer
from timing import bench, record, seconds_per_call

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MASK_ID, K = 8255, 8192

if CUDA:
    CONFIG, GRID, DTYPE = MeissonicConfig(), 64, torch.bfloat16
else:
    CONFIG = MeissonicConfig(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                             joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=(8, 12, 12))
    GRID, DTYPE = 16, torch.float32
TEXT_LEN, BATCH = 77, 2


def _peer_model(model):
    """The peer's Transformer2DModel with ``model``'s weights, or None when it cannot be imported."""
    src = os.environ.get("MEISSONIC_PEER_SRC")
    if not src:
        return None
    try:
        import diffusers
    except ImportError:
        return None
    if tuple(int(p) for p in diffusers.__version__.split(".")[:2]) >= (0, 33):
        return None  # the peer's attention fails there (its Attention has no head_dim)
    sys.path.insert(0, src)
    from src.transformer import Transformer2DModel
    from musefast.compat.meissonic import source_keys

    cfg = CONFIG
    peer = Transformer2DModel(**{k: getattr(cfg, k) for k in (
        "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope", "vocab_size",
        "codebook_size", "downsample", "upsample")})
    state = {}
    for name, tensor in model.state_dict().items():
        keys = source_keys(name)
        sizes = [peer.state_dict()[k].shape[0] for k in keys]
        for key, part in zip(keys, tensor.split(sizes)):
            state[key] = part.reshape(peer.state_dict()[key].shape)
    peer.load_state_dict(state)
    return peer.to(DEVICE, DTYPE).eval()


def test_forward(benchmark):
    torch.manual_seed(0)
    model = MeissonicTransformer(CONFIG).to(DEVICE, DTYPE).eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, K, (BATCH, GRID, GRID), generator=gen).to(DEVICE)
    hidden = torch.randn(BATCH, TEXT_LEN, CONFIG.joint_attention_dim, generator=gen).to(DEVICE, DTYPE)
    pooled = torch.randn(BATCH, CONFIG.pooled_projection_dim, generator=gen).to(DEVICE, DTYPE)
    micro = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 6.0], device=DEVICE)
    context = model.prepare_context(hidden, pooled, micro)
    timestep = torch.tensor([47], device=DEVICE)
    benchmark.group = f"meissonic forward {'real' if CUDA else 'reduced'} {GRID}x{GRID} tokens B={BATCH}"

    def forward():
        with torch.no_grad():
            return model(tokens, timestep=timestep, context=context)

    seconds = bench(benchmark, forward, DEVICE, rounds=3)
    anchors = {}
    peer = _peer_model(model)
    if peer is not None:
        from src.pipeline import _prepare_latent_image_ids

        img_ids = _prepare_latent_image_ids(BATCH, GRID, GRID, DEVICE, DTYPE)
        txt_ids = torch.zeros(TEXT_LEN, 3, device=DEVICE, dtype=DTYPE)

        def peer_forward():
            with torch.no_grad():
                return peer(hidden_states=tokens, encoder_hidden_states=hidden, pooled_projections=pooled,
                            timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, micro_conds=micro.expand(BATCH, -1))

        anchors["peer"] = seconds_per_call(peer_forward, DEVICE, min_seconds=0.5, warmup=1)
    n = sum(p.numel() for p in model.parameters())
    tokens_in_transformer = BATCH * (TEXT_LEN + (GRID // 2 if CONFIG.downsample else GRID) ** 2)
    record(benchmark, seconds=seconds, anchors=anchors, flops=2 * n * tokens_in_transformer)
    benchmark.extra_info.update(parameters=n, weight_bytes=n * torch.finfo(DTYPE).bits // 8,
                                peer_anchor="peer" in anchors)
    if CUDA:
        benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20


def test_step_at_1024(benchmark):
    N = 64 * 64
    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(1, N, K, generator=gen).to(DEVICE)
    uncond = torch.randn(1, N, K, generator=gen).to(DEVICE)
    tokens = torch.full((1, N), MASK_ID, device=DEVICE)
    masked = torch.ones(1, N, dtype=torch.bool, device=DEVICE)
    num_to_mask = torch.tensor([N - N // 48], device=DEVICE)
    benchmark.group = "meissonic step at 1024² (2 x 4096 x 8192 logits, g=9)"

    def fused():
        return ops.cfg_sample_remask(cond, uncond, tokens=tokens, masked=masked, num_to_mask=num_to_mask,
                                     guidance_scale=9.0, choice_temperature=2.0, seed=0, step=0)

    seconds = bench(benchmark, fused, DEVICE, rounds=3)
    anchors = {}
    if CUDA:
        sampler = AmusedCompatSampler(48, mask_token_id=MASK_ID, device=DEVICE)
        generator = torch.Generator(DEVICE).manual_seed(0)
        anchors["peer_step"] = seconds_per_call(
            lambda: sampler.step(uncond + 9.0 * (cond - uncond), 0, tokens, generator=generator), DEVICE)
    logits_bytes = 2 * N * K * cond.element_size()
    record(benchmark, seconds=seconds, anchors=anchors, bytes_moved=logits_bytes)
    benchmark.extra_info["logits_mb"] = logits_bytes / 2**20
    new, still = fused()
    assert int(still.sum()) == N - N // 48 and bool((new[~still] < K).all())


def test_vq_nearest_at_1024(benchmark):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(64 * 64, 64, generator=gen).to(DEVICE)
    codebook = torch.randn(K, 64, generator=gen).to(DEVICE)
    benchmark.group = "meissonic VQ encode at 1024² (4096 x 8192 x 64)"
    seconds = bench(benchmark, lambda: ops.vq_nearest(z, codebook), DEVICE, rounds=3)
    anchor = seconds_per_call(lambda: torch.cdist(z, codebook).argmin(-1), DEVICE)
    record(benchmark, seconds=seconds, anchors={"cdist_argmin": anchor}, flops=2 * z.shape[0] * K * 64)
    distances = torch.cdist(z.double(), codebook.double())  # ties are legal: check the distance reached
    chosen = distances.gather(1, ops.vq_nearest(z, codebook)[:, None])[:, 0]
    assert bool((chosen - distances.min(1).values <= 1e-4).all())
