"""aMUSEd end to end: musefast's AmusedPipeline vs diffusers' AmusedPipeline, in the same run.

GPU: the real amused-256 and amused-512 architectures (UVit2D 22 layers × 1024, VQ 8192 × 64,
f = 16, CLIP-L/14-sized text encoder), random weights, fp16, 12 steps, batch 1 and 8.
CPU: a reduced layout (fp32, 16×16 tokens, 8192 codes, 4 layers × 256), 4 steps, batch 1.

Both pipelines are built from one diffusers pipeline saved in diffusers' layout: musefast
loads the folder (``AmusedPipeline.from_pretrained``), diffusers keeps its objects. Recorded
per case: end-to-end ms of musefast (fused sampler; pytest-benchmark) and of diffusers, the
speedup, and a per-stage breakdown for both — text encoding (prompt + negative prompt),
the decoding steps (given text embeddings; includes musefast's per-call context preparation),
and the VQ decode — plus musefast's compat sampler and diffusers after ``musefast.accelerate``.
Skipped without diffusers.
"""
import sys
from pathlib import Path

import pytest
import torch

from timing import bench, seconds_per_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

diffusers = pytest.importorskip("diffusers")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
STEPS = 12 if CUDA else 4
SIZES = ["amused-256", "amused-512"] if CUDA else ["reduced"]
BATCHES = [1, 8] if CUDA else [1]
PROMPT = "a photo of a red cat on the house"

_UVIT = {  # diffusers UVit2DModel configs
    "amused-256": dict(sample_size=16),  # the class defaults are amused-256's
    "amused-512": dict(sample_size=32, downsample=True, upsample=True),
    "reduced": dict(sample_size=16, hidden_size=256, num_attention_heads=4, num_hidden_layers=4, in_channels=128,
                    block_out_channels=128, block_num_heads=4, num_res_blocks=1, intermediate_size=704,
                    cond_embed_dim=256, encoder_hidden_size=256),
}
_VQ = {
    "full": dict(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2),
    "reduced": dict(block_out_channels=(32, 32, 64, 64, 64), layers_per_block=1),
}


def _clip(size, folder):
    """A random CLIP text encoder (CLIP-L/14 widths on GPU) with the offline test tokenizer."""
    from tiny_text import clip_vocab_and_merges
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    full = size != "reduced"
    config = CLIPTextConfig(
        vocab_size=49408 if full else len(vocab), hidden_size=768 if full else 256,
        intermediate_size=3072 if full else 512, num_hidden_layers=12 if full else 2,
        num_attention_heads=12 if full else 4, projection_dim=768 if full else 256, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval(), tokenizer


@pytest.fixture(scope="module", params=SIZES)
def pipes(request, tmp_path_factory):
    from diffusers import AmusedPipeline as DiffusersAmused
    from diffusers import AmusedScheduler, UVit2DModel, VQModel

    from musefast.pipelines.amused import AmusedPipeline

    size = request.param
    torch.manual_seed(0)
    vq_kw = _VQ["reduced" if size == "reduced" else "full"]
    levels = len(vq_kw["block_out_channels"])
    vqvae = VQModel(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                    latent_channels=64, num_vq_embeddings=8192, norm_num_groups=32, mid_block_add_attention=False,
                    lookup_from_codebook=True, force_upcast=True, **vq_kw).eval()
    text_encoder, tokenizer = _clip(size, tmp_path_factory.mktemp("clip"))
    transformer = UVit2DModel(**_UVIT[size]).eval()
    with torch.no_grad():  # GRN and norm parameters start at 0 / 1: give them values
        for name, p in transformer.named_parameters():
            if "gamma" in name or "beta" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs = DiffusersAmused(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                             scheduler=AmusedScheduler(mask_token_id=8255))
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp(size)
    theirs.to(dtype=DTYPE).save_pretrained(folder)
    theirs.to(DEVICE)
    ours = AmusedPipeline.from_pretrained(folder, device=DEVICE, dtype=DTYPE)
    return size, theirs, ours


def _their_text(pipe, prompts):
    def encode():
        out = []
        for batch in (prompts, [""] * len(prompts)):
            ids = pipe.tokenizer(batch, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length).input_ids.to(DEVICE)
            o = pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
            out.append((o.text_embeds, o.hidden_states[-2]))
        return out

    return encode


@pytest.mark.parametrize("batch", BATCHES)
def test_amused_end_to_end(benchmark, pipes, batch):
    size, theirs, ours = pipes
    prompts = [PROMPT] * batch
    benchmark.group = f"aMUSEd {size} B={batch} {STEPS} steps {str(DTYPE)[6:]}"
    gen = lambda: torch.Generator(DEVICE).manual_seed(0)  # noqa: E731
    kw = dict(num_inference_steps=STEPS)

    with torch.no_grad():
        def ours_e2e():
            return ours(prompts, seed=0, output_type="pt", progress=False, **kw)

        seconds = bench(benchmark, ours_e2e, DEVICE, rounds=3)
        pooled, hidden, _ = ours.encode_text(prompts, use_cfg=True)
        neg = dict(negative_prompt_embeds=pooled[:batch], negative_encoder_hidden_states=hidden[:batch])
        emb = dict(prompt_embeds=pooled[batch:], encoder_hidden_states=hidden[batch:], **neg)
        tokens = ours(seed=0, output_type="latent", progress=False, **emb, **kw)
        stages = {
            "musefast_text_ms": lambda: ours.encode_text(prompts, use_cfg=True),
            "musefast_steps_ms": lambda: ours(seed=0, output_type="latent", progress=False, **emb, **kw),
            "musefast_decode_ms": lambda: ours.decode(tokens),
            "musefast_compat_e2e_ms": lambda: ours(prompts, seed=0, output_type="pt", progress=False,
                                                   sampler="compat", **kw),
        }
        (tp, th), (np_, nh) = _their_text(theirs, prompts)()
        their_emb = dict(prompt_embeds=tp, encoder_hidden_states=th, negative_prompt_embeds=np_,
                         negative_encoder_hidden_states=nh)
        h, w = tokens.shape[1:]

        def their_decode():
            theirs.vqvae.float()  # what diffusers' pipeline does for a force_upcast fp16 VQ
            out = theirs.vqvae.decode(tokens, force_not_quantize=True, shape=(batch, h, w, 64)).sample
            theirs.vqvae.to(DTYPE)
            return out

        stages.update({
            "diffusers_text_ms": _their_text(theirs, prompts),
            "diffusers_steps_ms": lambda: theirs(generator=gen(), output_type="latent", **their_emb, **kw),
            "diffusers_decode_ms": their_decode,
            "diffusers_e2e_ms": lambda: theirs(prompts, generator=gen(), output_type="pt", **kw),
        })
        info = benchmark.extra_info
        for name, fn in stages.items():
            info[name] = 1e3 * seconds_per_call(fn, DEVICE, min_seconds=0.5 if CUDA else 0.2, warmup=2)
        import musefast

        musefast.accelerate(theirs)  # in place: diffusers' pipeline with musefast kernels
        info["diffusers_accelerated_e2e_ms"] = 1e3 * seconds_per_call(
            lambda: theirs(prompts, generator=gen(), output_type="pt", **kw), DEVICE, min_seconds=0.5, warmup=2)
        theirs.scheduler.__dict__.pop("step")  # back to diffusers' own step for the next case
        from diffusers.models.attention_processor import AttnProcessor2_0

        theirs.transformer.set_attn_processor(AttnProcessor2_0())
    info["musefast_e2e_ms"] = seconds * 1e3
    info["speedup_vs_diffusers"] = info["diffusers_e2e_ms"] / info["musefast_e2e_ms"]
    info["speedup_steps"] = info["diffusers_steps_ms"] / info["musefast_steps_ms"]
    info.update(size=size, batch=batch, steps=STEPS, dtype=str(DTYPE), threads=torch.get_num_threads())
