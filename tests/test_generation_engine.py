"""The engine on the demo model: tokens equal the pipeline's per seed, batch invariance,
rows shared across requests, join / leave / cancel / preview, bounded queue."""
import hashlib

import pytest
import torch

import musefast
from musefast.generation import Cancelled, Engine, QueueFull, Request, State

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
            "a yellow ring at the bottom", "a purple cross in the centre", "an orange diamond above a red ring"]


@pytest.fixture(scope="module")
def pipe():
    return musefast.load("demo")


def _mixed(n, offset=0):
    guidance = [1.5, 1.0, 3.0, 0.5]
    intervals = [None, None, (0.0, 0.5), (0.3, 1.0)]
    return [Request(prompt=CAPTIONS[i % len(CAPTIONS)], seed=1000 + offset + i, num_steps=[3, 5, 2, 4][i % 4],
                    guidance_scale=guidance[i % 4], guidance_interval=intervals[(i // 4) % 4],
                    negative_prompt="a blue square" if i % 5 == 0 else None)
            for i in range(n)]


def _solo(pipe, r):
    return pipe(r.prompt, negative_prompt=r.negative_prompt, seed=r.seed, num_steps=r.num_steps,
                guidance_scale=r.guidance_scale, guidance_interval=r.guidance_interval, output_type="tokens",
                progress=False)[0]


def _staggered(engine, requests, per_step):
    handles, pending = [], list(requests)
    while pending or engine.busy:
        for _ in range(min(per_step, len(pending))):
            handles.append(engine.submit(pending.pop(0)))
        engine.step()
    return [h.result() for h in handles]


def _hashes(tokens):
    return [hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in tokens]


def test_tokens_equal_the_pipeline_calls_and_do_not_depend_on_the_batch(pipe):
    requests = _mixed(16)
    solo = [_solo(pipe, r) for r in requests]
    for max_batch, per_step in ((1, 1), (3, 1), (16, 16), (6, 2)):
        tokens = _staggered(Engine(pipe, max_batch=max_batch), requests, per_step)
        assert _hashes(tokens) == _hashes(solo), (max_batch, per_step)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _hashes(_staggered(Engine(pipe, max_batch=5), requests, 3)) == _hashes(solo)
    finally:
        torch.set_num_threads(before)
    assert len(set(_hashes(solo))) == len(solo)


def test_one_forward_per_step_with_unconditional_rows_only_where_guidance_runs(pipe):
    engine = Engine(pipe, max_batch=8)
    rows = []
    run = engine.adapter.run
    engine.adapter.run = lambda kind, tokens, *a: rows.append(tokens.shape[0]) or run(kind, tokens, *a)
    # guided at every step / never / only in the first half of the steps (4 steps: steps 0 and 1)
    engine.run([Request(prompt=CAPTIONS[0], num_steps=4, guidance_scale=3.0),
                Request(prompt=CAPTIONS[1], num_steps=4, guidance_scale=1.0),
                Request(prompt=CAPTIONS[2], num_steps=4, guidance_scale=3.0, guidance_interval=(0.0, 0.5))])
    assert rows == [2 + 1 + 2, 2 + 1 + 2, 2 + 1 + 1, 2 + 1 + 1] and engine.forwards == 4


def test_requests_join_and_leave_at_step_boundaries(pipe):
    engine = Engine(pipe, max_batch=2)
    a = engine.submit(Request(prompt=CAPTIONS[0], seed=1, num_steps=2))
    b = engine.submit(Request(prompt=CAPTIONS[1], seed=2, num_steps=4))
    c = engine.submit(Request(prompt=CAPTIONS[2], seed=3, num_steps=2))
    assert (engine.in_flight, engine.queued) == (0, 3)
    engine.step()
    assert (a.state, b.state, c.state) == (State.RUNNING, State.RUNNING, State.QUEUED)
    engine.step()
    assert a.done() and engine.in_flight == 1 and c.state is State.QUEUED  # a left; c joins at the next step
    engine.step()
    assert c.state is State.RUNNING and (b.steps_done, c.steps_done) == (3, 1)
    while engine.busy:
        engine.step()
    for handle in (a, b, c):
        assert torch.equal(handle.result(), _solo(pipe, handle.request))


def test_cancel_preview_and_errors(pipe):
    engine = Engine(pipe, max_batch=4, max_queue=3)
    keep = engine.submit(Request(prompt=CAPTIONS[0], seed=5, num_steps=3))
    gone = engine.submit(Request(prompt=CAPTIONS[1], seed=6, num_steps=3))
    queued = engine.submit(Request(prompt=CAPTIONS[2], seed=7, num_steps=3))
    with pytest.raises(QueueFull, match="holds 3"):
        engine.submit(Request(prompt=CAPTIONS[3]))
    assert queued.cancel() and keep.preview() is None
    engine.step()
    preview = keep.preview()
    assert preview.shape == (3, pipe.output_size, pipe.output_size) and 0 <= preview.min() <= preview.max() <= 1
    assert gone.cancel() and not gone.cancel() and engine.in_flight == 1
    tokens = keep.result()
    assert torch.equal(tokens, _solo(pipe, keep.request))  # a batch-mate leaving changes nothing
    assert torch.equal(keep.preview(), pipe.decode(tokens[None])[0])
    assert keep.image().size == (pipe.output_size, pipe.output_size)
    for handle in (gone, queued):
        with pytest.raises(Cancelled):
            handle.result()
    bad = engine.submit(Request(prompt_embeds=torch.zeros(2, 16, 64)))  # two images' embeddings in one request
    good = engine.submit(Request(prompt=CAPTIONS[3], seed=8, num_steps=2))
    with pytest.raises(ValueError, match="one image"):
        bad.result()
    assert bad.state is State.FAILED and torch.equal(good.result(), _solo(pipe, good.request))
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        Engine(pipe, max_batch=0)


def test_step_cache_and_inpainting_requests_equal_the_pipeline(pipe):
    cached = Request(prompt=CAPTIONS[0], seed=11, cache="fast")
    image = pipe.decode(_solo(pipe, Request(prompt=CAPTIONS[4], seed=12, num_steps=4))[None])[0]
    mask = torch.zeros(pipe.output_size, pipe.output_size, dtype=torch.bool)
    mask[:, : pipe.output_size // 2] = True
    inpaint = Request(prompt=CAPTIONS[1], seed=13, num_steps=4, init_image=image, mask=mask)
    plain = Request(prompt=CAPTIONS[2], seed=14, num_steps=6)
    got = [h.result() for h in Engine(pipe, max_batch=3).run([cached, inpaint, plain])]
    assert torch.equal(got[0], pipe(cached.prompt, seed=11, cache="fast", output_type="tokens", progress=False)[0])
    assert torch.equal(got[1], pipe.inpaint(image, mask, inpaint.prompt, seed=13, num_steps=4, output_type="tokens",
                                            progress=False)[0])
    assert torch.equal(got[2], _solo(pipe, plain))


def test_a_pipeline_call_is_one_job_that_shares_forwards_with_requests(pipe):
    """A call's images as one prepared job of B rows (what pipe(...) submits) decode in lock-step
    under the call's seed, in the same forwards as other requests, with the call's tokens."""
    prompts = [CAPTIONS[0], CAPTIONS[1]]
    alone = pipe(prompts, seed=5, num_steps=4, output_type="tokens", progress=False)
    s = pipe._settings(dict(num_steps=4))
    cond, uncond = pipe._prepare(prompts, None, None, None, 1)
    cfg = pipe.transformer.config
    tokens = torch.full((2, cfg.seq_len), cfg.mask_token_id)
    job = pipe._stage("base", tokens, torch.ones(2, cfg.seq_len, dtype=torch.bool), cond, uncond, s, 5, None)
    requests = _mixed(3)
    engine = Engine(pipe, max_batch=8)
    rows = []
    run = engine.adapter.run
    engine.adapter.run = lambda kind, tokens, *a: rows.append(tokens.shape[0]) or run(kind, tokens, *a)
    others = [engine.submit(r) for r in requests]
    handle = engine.submit_stage(job)
    engine.step()
    assert rows[0] > 2 * 2  # the job's rows and the requests' in one forward
    assert torch.equal(handle.result(), alone)
    assert _hashes([h.result() for h in others]) == _hashes([_solo(pipe, r) for r in requests])
    with pytest.raises(ValueError, match="seed has 1 entries for a batch of 2"):
        pipe._stage("base", tokens, torch.ones(2, cfg.seq_len, dtype=torch.bool), cond, uncond, s, [5], None)
