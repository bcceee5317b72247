"""musefast.sampling: mask / guidance / temperature schedules, peer presets, MaskGitSampler."""
import math

import pytest
import torch

from musefast.sampling import (
    PRESETS,
    MaskGitSampler,
    Preset,
    choice_temperature_at,
    guidance_scale_at,
    mask_count,
    mask_ratio,
    temperature_at,
)


def counts_of_a_full_run(rule, N, T, **kw):
    """Masked positions left after each step when the previous step's count is what remains."""
    start = torch.tensor([N])
    now, out = start, []
    for step in range(T):
        now = mask_count(rule, step, T, masked_now=now, masked_start=start, seq_len=N, **kw)
        out.append(int(now))
    return out


def test_amused_mask_counts_match_diffusers_float32_cosine():
    # AmusedScheduler, N = 256, T = 12 (its float32 cosine gives 127 at step 8, not 128)
    assert counts_of_a_full_run("amused", 256, 12) == [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 0]


def test_maskgit_mask_counts():
    N, T = 256, 8
    got = counts_of_a_full_run("maskgit", N, T)
    want = [math.floor(N * math.cos(math.pi / 2 * (i + 1) / T)) for i in range(T - 1)] + [0]
    assert got[:-1] == [max(1, w) for w in want[:-1]] and got[-1] == 0
    # per image, from each image's own starting count, clamped to [1, masked - 1]
    start = torch.tensor([256, 100, 3])
    c = mask_count("maskgit", 0, T, masked_now=start, masked_start=start, seq_len=N)
    assert c.tolist() == [math.floor(256 * math.cos(math.pi / 16)), math.floor(100 * math.cos(math.pi / 16)), 2]
    c = mask_count("maskgit", 6, T, masked_now=torch.tensor([2, 1]), masked_start=start[:2], seq_len=N)
    assert c.tolist() == [1, 1]


def test_lucidrains_mask_counts_are_its_next_steps_counts():
    N, T = 256, 18
    t = torch.linspace(0, 1, T)
    want = [max(int((torch.cos(t[i + 1] * math.pi * 0.5) * N).item()), 1) for i in range(T - 1)] + [0]
    assert counts_of_a_full_run("lucidrains", N, T) == want
    c = mask_count("lucidrains", 0, T, masked_now=torch.tensor([256, 10]), masked_start=torch.tensor([256, 10]),
                   seq_len=N)
    assert c.tolist() == [want[0], want[0]]  # one count for the whole batch (the op clamps it)


def test_amused_inpainting_counts_scale_with_starting_ratio():
    N, T = 256, 12
    start = torch.tensor([64, 64])
    c = mask_count("amused", 0, T, masked_now=start, masked_start=start, seq_len=N, schedule="linear",
                   starting_mask_ratio=torch.tensor(128) / 512)
    assert c.tolist() == [math.floor(N * 0.25 * (1 - 1 / 12))] * 2


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow", "pow3", "log", "exp", "arccos"])
def test_mask_ratio_endpoints_and_monotone(schedule):
    r = torch.linspace(0, 1, 101)
    ratio = mask_ratio(schedule, r, total_tokens=256)
    assert ratio.dtype == torch.float32
    start = 1 - 1 / 256 if schedule == "exp" else 1.0  # MaskGIT's exp starts one token short of all
    assert float(ratio[0]) == pytest.approx(start, abs=1e-6) and float(ratio[-1]) == pytest.approx(0.0, abs=1e-6)
    assert bool((ratio[1:] <= ratio[:-1] + 1e-7).all())


def test_mask_ratio_values():
    assert float(mask_ratio("pow2", 0.5)) == pytest.approx(0.75)
    assert float(mask_ratio("arccos", 0.5)) == pytest.approx(2 / 3)
    assert float(mask_ratio("log", 0.5, total_tokens=256)) == pytest.approx(1 / 8)
    assert float(mask_ratio("exp", 0.5, total_tokens=256)) == pytest.approx(1 - 2**-4)
    with pytest.raises(ValueError, match="total_tokens"):
        mask_ratio("log", 0.5)
    with pytest.raises(ValueError, match="mask schedule"):
        mask_ratio("square", 0.5)


def test_guidance_schedules():
    T = 12
    assert [guidance_scale_at("constant", 10.0, i, T) for i in (0, 11)] == [10.0, 10.0]
    lin = [guidance_scale_at("linear", 10.0, i, T) for i in range(T)]
    assert lin[0] == 1.0 and lin[-1] == 10.0 and all(b - a == pytest.approx(9 / 11) for a, b in zip(lin, lin[1:]))
    cos = [guidance_scale_at("cosine", 10.0, i, T) for i in range(T)]
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(10.0) and cos[1] < lin[1]
    assert guidance_scale_at("linear", 4.0, 0, 1) == 4.0
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_scale_at("exp", 4.0, 0, 3)


def test_choice_and_sampling_temperatures():
    T = 12
    amused = [choice_temperature_at("linear", (2.0, 0.0), i, T) for i in range(T)]
    assert amused == torch.linspace(2, 0, T).tolist()
    assert choice_temperature_at("maskgit", 4.5, 3, 8) == pytest.approx(4.5 * (1 - 4 / 8))
    assert choice_temperature_at("constant", 1.5, 3, 8) == 1.5
    assert [temperature_at("lucidrains", 1.0, i, 4) for i in range(4)] == [0.75, 0.5, 0.25, 0.0]
    assert temperature_at("constant", 0.7, 2, 4) == 0.7


def test_presets_step_parameters():
    N, K = 256, 8192
    full = torch.tensor([N, N])
    p = PRESETS["amused"].step_params(0, num_classes=K, masked_now=full, masked_start=full, seq_len=N)
    assert p["num_to_mask"].tolist() == [253, 253]
    assert (p["guidance_scale"], p["temperature"], p["choice_temperature"], p["top_k"], p["confidence"]) == (
        10.0, 1.0, 2.0, None, "logprob")
    p = PRESETS["lucidrains"].step_params(17, num_classes=K, masked_now=full, masked_start=full, seq_len=N)
    assert (p["top_k"], p["temperature"], p["choice_temperature"], p["confidence"], p["guidance_scale"]) == (
        820, 0.0, 0.0, "prob", 3.0)
    assert p["num_to_mask"].tolist() == [0, 0]
    p = PRESETS["maskgit"].step_params(0, num_classes=K, masked_now=full, masked_start=full, seq_len=N)
    assert p["choice_temperature"] == pytest.approx(4.5 * 7 / 8) and p["guidance_scale"] == 1.0
    assert PRESETS["amused"].replace(num_steps=16, guidance_scale=None).num_steps == 16


# -- the sampler -----------------------------------------------------------------------------

MASK_ID = 99


class ToyModel:
    """Logits that prefer token (n * 7 + tokens of the left neighbour) % K, plus noise."""

    def __init__(self, K, seed=0, cfg=False):
        self.K, self.cfg, self.calls = K, cfg, []
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, tokens):
        self.calls.append(tokens.clone())
        shape = tokens.shape
        tokens = tokens.reshape(shape[0], -1)
        B, N = tokens.shape
        assert bool(((tokens == MASK_ID) | ((tokens >= 0) & (tokens < self.K))).all())
        want = (torch.arange(N) * 7 + torch.roll(tokens, 1, 1).clamp(max=self.K - 1)) % self.K
        logits = torch.randn(B, N, self.K, generator=self.g)
        logits.scatter_add_(2, want[..., None], torch.full((B, N, 1), 4.0))
        logits = logits.reshape(*shape, self.K)  # (B, *token_shape, K)
        if self.cfg:
            return logits, torch.randn(*shape, self.K, generator=self.g)
        return logits


@pytest.mark.parametrize("preset", ["amused", "maskgit", "lucidrains"])
def test_sampler_generates_everything_with_the_schedule(preset):
    B, N, K = 2, 64, 32
    tokens = torch.full((B, N), MASK_ID)
    seen = []
    sampler = MaskGitSampler(preset, progress=False, num_steps=6)
    out = sampler(ToyModel(K), tokens, mask_token_id=MASK_ID, seed=3,
                  callback=lambda step, t, m: seen.append(int(m[0].sum())))
    assert out.shape == (B, N) and bool(((out >= 0) & (out < K)).all())
    assert seen[-1] == 0 and all(b <= a for a, b in zip(seen, seen[1:]))
    rule = sampler.preset.mask_count_rule
    assert seen == counts_of_a_full_run(rule, N, 6)


def test_sampler_inpainting_keeps_known_tokens_and_shape():
    B, h, w, K = 2, 6, 8, 32
    known = torch.randint(0, K, (B, h, w))
    masked = torch.zeros(B, h, w, dtype=torch.bool)
    masked[:, 2:5, 3:7] = True
    model = ToyModel(K)
    out = MaskGitSampler("amused", progress=False)(model, known.clone(), masked, mask_token_id=MASK_ID, seed=0)
    assert out.shape == (B, h, w)
    assert torch.equal(out[~masked], known[~masked])
    assert len(model.calls) == 12
    assert bool((model.calls[0].reshape(B, h, w)[masked] == MASK_ID).all())
    assert bool((model.calls[0].reshape(B, h, w)[~masked] == known[~masked]).all())


def test_sampler_is_deterministic_per_seed_and_backend_independent():
    B, N, K = 2, 48, 40
    tokens = torch.full((B, N), MASK_ID)
    run = lambda seed, backend: MaskGitSampler("amused", progress=False, num_steps=5, backend=backend)(  # noqa: E731
        ToyModel(K, cfg=True), tokens, mask_token_id=MASK_ID, seed=seed)
    a, b, c = run(1, "cpu"), run(1, "cpu"), run(2, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, run(1, "reference"))


def test_sampler_follows_the_logits():
    B, N, K = 2, 64, 16
    target = torch.arange(N) % K

    def peaked(tokens):
        return torch.nn.functional.one_hot(target, K).float().expand(B, N, K) * 30.0

    out = MaskGitSampler("maskgit", progress=False)(peaked, torch.full((B, N), MASK_ID), mask_token_id=MASK_ID)
    assert torch.equal(out, target.expand(B, N))


def test_sampler_start_step_and_bad_arguments():
    K = 16
    tokens = torch.randint(0, K, (1, 32))
    tokens[0, :8] = MASK_ID
    model = ToyModel(K)
    out = MaskGitSampler("amused", progress=False)(model, tokens, mask_token_id=MASK_ID, start_step=9)
    assert len(model.calls) == 3 and not bool((out == MASK_ID).any())
    with pytest.raises(TypeError, match="unknown preset field"):
        MaskGitSampler("amused", steps=3)
    with pytest.raises(ValueError, match="preset"):
        MaskGitSampler("muse")
    with pytest.raises(ValueError, match="start_step"):
        MaskGitSampler("amused", progress=False)(model, tokens, mask_token_id=MASK_ID, start_step=12)
    with pytest.raises(TypeError, match="tokens"):
        MaskGitSampler("amused", progress=False)(model, tokens.int(), mask_token_id=MASK_ID)
    assert isinstance(MaskGitSampler(Preset("mine", num_steps=2)).preset, Preset)
