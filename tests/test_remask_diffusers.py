"""The ``amused`` preset against diffusers' AmusedScheduler (diffusers is a test extra).

Both sides get the same probabilities (the same logits and CFG) and the same uniform noise
for the confidence; diffusers' own multinomial draws are fed to the reference's confidence
and selection, since a multinomial and a Gumbel-max cannot turn the same uniforms into the
same draw (that both follow softmax(l) is tested in test_remask.py).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
scheduling_amused = pytest.importorskip("diffusers.schedulers.scheduling_amused")
AmusedScheduler = diffusers.AmusedScheduler

from musefast.reference import philox  # noqa: E402
from musefast.reference import remask as ref  # noqa: E402
from musefast.sampling import PRESETS, mask_count  # noqa: E402

MASK_ID = 8255


def _scheduler(T, schedule="cosine"):
    s = AmusedScheduler(mask_token_id=MASK_ID, masking_schedule=schedule)
    s.set_timesteps(T)  # default choice temperatures (2, 0)
    return s


def test_mask_counts_of_a_diffusers_run():
    B, N, K, T = 2, 256, 64, 12
    sched = _scheduler(T)
    sample = torch.full((B, N), MASK_ID)
    gen = torch.Generator().manual_seed(0)
    theirs = []
    for t in sched.timesteps:
        sample = sched.step(torch.randn(B, N, K), t, sample, generator=gen).prev_sample
        theirs.append((sample == MASK_ID).sum(1).tolist())
    assert [c[0] for c in theirs] == [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 0]
    now, start, ours = torch.tensor([N, N]), torch.tensor([N, N]), []
    for step in range(T):
        now = mask_count("amused", step, T, masked_now=now, masked_start=start, seq_len=N)
        ours.append(now.tolist())
    assert ours == theirs


def test_inpainting_counts_of_a_diffusers_run():
    # diffusers' inpaint pipeline: linear schedule, starting_mask_ratio = masked fraction
    B, N, K, T = 2, 256, 64, 12
    sched = _scheduler(T, "linear")
    gen = torch.Generator().manual_seed(1)
    masked = torch.zeros(B, N, dtype=torch.bool)
    masked[:, 40:140] = True
    sample = torch.randint(0, K, (B, N)).masked_fill(masked, MASK_ID)
    ratio = masked.sum() / masked.numel()
    now, start = masked.sum(1), masked.sum(1)
    for step, t in enumerate(sched.timesteps):
        sample = sched.step(torch.randn(B, N, K), t, sample, starting_mask_ratio=ratio, generator=gen).prev_sample
        now = mask_count("amused", step, T, masked_now=now, masked_start=start, seq_len=N, schedule="linear",
                         starting_mask_ratio=ratio)
        assert (sample == MASK_ID).sum(1).tolist() == now.tolist(), step


def test_cfg_combine_is_the_same_formula():
    cond, uncond = torch.randn(2, 64, 100), torch.randn(2, 64, 100)
    for g in (10.0, 3.0, 0.5):
        # AmusedPipeline: uncond_logits + guidance_scale * (cond_logits - uncond_logits)
        assert torch.equal(ref.guided_logits(cond, uncond, g), uncond + g * (cond - uncond))


@pytest.mark.parametrize("step", [0, 3, 7, 10])
def test_step_decisions_match_diffusers(monkeypatch, step):
    B, N, K, T, g = 2, 256, 128, 12, 10.0
    preset = PRESETS["amused"]
    assert preset.num_steps == T and preset.guidance_scale == g
    sched = _scheduler(T)
    gen = torch.Generator().manual_seed(step)
    cond, uncond = torch.randn(B, N, K, generator=gen), torch.randn(B, N, K, generator=gen)
    # the state before this step: as many masked positions as the schedule leaves
    full = torch.tensor([N, N])
    before = full if step == 0 else mask_count("amused", step - 1, T, masked_now=full, masked_start=full, seq_len=N)
    masked = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        masked[b, torch.randperm(N, generator=gen)[: int(before[b])]] = True
    sample = torch.randint(0, K, (B, N), generator=gen).masked_fill(masked, MASK_ID)

    # the same uniform noise for the confidence on both sides: Philox stream 1
    seed = 99 + step
    word = philox.philox4x32(0, torch.arange(N)[None, :], torch.arange(B)[:, None],
                             philox.counter_word3(philox.STREAM_CHOICE, step), *philox.split_seed(seed))[0]
    u = philox.uniform_from_bits(word)

    def their_gumbel_noise(t, generator=None):  # diffusers' own transform of the uniforms
        return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))

    draws = []
    real_multinomial = torch.multinomial

    def recording_multinomial(*args, **kwargs):
        out = real_multinomial(*args, **kwargs)
        draws.append(out)
        return out

    monkeypatch.setattr(scheduling_amused, "gumbel_noise", their_gumbel_noise)
    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    model_output = uncond + g * (cond - uncond)  # AmusedPipeline's CFG combine
    out = sched.step(model_output, sched.timesteps[step], sample, generator=gen)
    monkeypatch.undo()
    drawn = draws[0][:, 0].view(B, N)
    their_masked = out.prev_sample == MASK_ID

    # ours: the preset's parameters, the reference's confidence and selection, same draws/noise
    params = preset.step_params(step, num_classes=K, masked_now=masked.sum(1), masked_start=full, seq_len=N)
    assert params["choice_temperature"] == float(sched.temperatures[step])
    l = ref.guided_logits(cond, uncond, params["guidance_scale"])
    x = torch.where(masked, drawn, sample)
    logprob = ref.log_softmax_at(l.reshape(-1, K), x.reshape(-1)).reshape(B, N)
    conf, stay = ref.remask_from_logprob(logprob, masked, params["num_to_mask"], params["choice_temperature"],
                                         philox.gumbel_from_uniform(u), params["confidence"])
    ours_tokens = torch.where(stay, MASK_ID, x)
    assert torch.equal(out.pred_original_sample, x)

    # decisions equal up to counted near-ties of the confidence at the selection boundary
    differ = stay != their_masked
    near = 0
    for b in range(B):
        n = int(stay[b].sum())
        assert int(their_masked[b].sum()) <= n  # diffusers masks fewer only on exact ties
        if not differ[b].any():
            continue
        values = torch.sort(conf[b][masked[b]]).values
        gap = float(values[n] - values[n - 1]) if 0 < n < values.numel() else float("inf")
        assert gap <= 1e-5 * (1 + float(values.abs().max())), f"image {b}: decisions differ, boundary gap {gap}"
        near += 1
    assert near <= 1
    assert torch.equal(ours_tokens[~differ], out.prev_sample[~differ])
