"""The pipelines' decoding: a call's prepared images run as one job on an engine.

Every pipeline (``MusePipeline``, ``AmusedPipeline``, ``MeissonicPipeline`` and the edits built
on them) prepares its call's stage — text encoded, contexts, initial tokens, the sampler's
preset, all rows of the call — and hands it here. The job decodes in lock-step under the
call's seed (or one seed per image), so its tokens are those ``MaskGitSampler`` gives the
same batch; the forward, the step cache and the fused step are the engine's, the same code a
server or ``musefast batch`` runs.
"""
from __future__ import annotations

import torch

from musefast.generation.adapters import Stage
from musefast.generation.scheduler import Engine


@torch.no_grad()
def decode_stage(pipe, stage: Stage, *, backend: str | None = None, progress: bool = False,
                 desc: str = "decoding", callback=None) -> torch.Tensor:
    """Decode ``stage`` to the end on an engine of its own -> tokens (B, h, w) int64.

    ``callback(step, tokens, masked)`` runs after every step with the tokens in the stage's
    input shape; a tensor it returns replaces the tokens (its mask-token entries are the masked
    ones), as :meth:`musefast.sampling.MaskGitSampler.__call__`'s callback."""
    engine = Engine(pipe, max_batch=stage.rows, backend=backend)
    handle = engine.submit_stage(stage, on_step=None if callback is None else _replacing(callback))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stage.num_steps - stage.step, desc=desc, leave=False)
    try:
        while not handle.done():
            engine.step()
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return handle.result()


def _replacing(callback):
    def on_step(stage: Stage) -> None:
        replaced = callback(stage.step, stage.tokens.reshape(stage.shape), stage.masked.reshape(stage.shape))
        if replaced is not None:
            stage.tokens = replaced.reshape(stage.rows, -1).to(stage.tokens)
            stage.masked = stage.tokens == stage.mask_token_id

    return on_step
