"""End-to-end Muse latency per stage: text encode, base steps, super-res steps, VQ decode.

GPU: Muse-paper sizes (base ≈656M, super-res ≈269M, random weights, fp16, T5-XXL-width text).
CPU: the ``small`` layout (fp32) with fewer steps. Anchor, in the same run: the same pipeline
with every op on its pure-PyTorch ``reference`` backend (the peers' eager formulation).
"""
import sys
from pathlib import Path

import pytest
import torch

from musefast.pipelines.random_init import parameter_count, random_pipeline
from timing import seconds_per_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZE = "paper" if CUDA else "small"
STEPS = (24, 8) if CUDA else (4, 2)
DTYPE = torch.float16 if CUDA else torch.float32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from musefast.models.text import load_text_encoder
    from tiny_text import make_tiny_t5

    # Text stage: a random T5 encoder (tiny on CPU; T5-large width on GPU), timed separately;
    # the transformers get T5-XXL-width embeddings on GPU, as in the paper.
    t5 = load_text_encoder(make_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=64 if not CUDA else 1024,
                                        num_layers=2 if not CUDA else 24), device=DEVICE)
    pipe = random_pipeline(SIZE, super_res=True).to(DEVICE, DTYPE)
    text_dim = pipe.transformer.config.text_dim
    hidden = torch.randn(1, 77, text_dim, device=DEVICE, dtype=DTYPE)
    return t5, pipe, hidden


@pytest.mark.parametrize("batch", [1] if not CUDA else [1, 8])
def test_pipeline_stages(benchmark, setup, batch, monkeypatch):
    from musefast.models.text import TextEmbeddings

    t5, pipe, hidden = setup
    emb = TextEmbeddings(hidden.expand(batch, -1, -1), torch.ones(batch, 77, dtype=torch.bool, device=DEVICE))
    s = pipe._settings(dict(num_steps=STEPS[0], super_res_steps=STEPS[1]))
    low = torch.zeros(batch, 16, 16, dtype=torch.long, device=DEVICE)

    def stages():
        cfg, hcfg = pipe.transformer.config, pipe.super_res.config.high
        full = lambda c: (torch.full((batch, c.seq_len), c.mask_token_id, device=DEVICE),
                          torch.ones(batch, c.seq_len, dtype=torch.bool, device=DEVICE))
        return {
            "text_encode": lambda: t5.encode(["a photo of a red cat on the house"] * batch),
            "base_steps": lambda: pipe._decode_stage(stage="base", tokens=full(cfg)[0], masked=full(cfg)[1], cond=emb,
                                                     uncond=emb, s=s, seed=0, backend=None, progress=False),
            "super_res_steps": lambda: pipe._decode_stage(stage="super-res", tokens=full(hcfg)[0], masked=full(hcfg)[1],
                                                          cond=emb, uncond=emb, s=s, seed=0, backend=None,
                                                          progress=False, low_tokens=low),
            "vq_decode": lambda: pipe.decode(torch.zeros(batch, hcfg.grid_size, hcfg.grid_size, dtype=torch.long,
                                                         device=DEVICE)),
        }

    fast = {name: seconds_per_call(fn, DEVICE, min_seconds=0.5, warmup=1) for name, fn in stages().items()}
    total = sum(fast.values())
    monkeypatch.setenv("MUSEFAST_BACKEND", "reference")
    ref = {name: seconds_per_call(fn, DEVICE, min_seconds=0.5, warmup=1) for name, fn in stages().items()}
    monkeypatch.delenv("MUSEFAST_BACKEND")
    benchmark.group = f"pipeline {SIZE} batch {batch}"
    benchmark.pedantic(lambda: None, rounds=1)
    info = benchmark.extra_info
    info.update({f"{k}_ms": v * 1e3 for k, v in fast.items()})
    info.update({f"reference_{k}_ms": v * 1e3 for k, v in ref.items()})
    info["total_ms"] = total * 1e3
    info["speedup_vs_reference"] = sum(ref.values()) / total
    info["steps"] = list(STEPS)
    info["base_params_M"] = parameter_count(pipe.transformer) / 1e6
    info["super_res_params_M"] = parameter_count(pipe.super_res) / 1e6
