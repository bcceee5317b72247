"""Does a row's forward depend on its batch-mates or the thread count? aMUSEd-256's U-ViT
(random weights, musefast's CPU paths) on 4 rows at 1 or 2 threads.

Prints, for batches of the first 1, 2 and 3 rows, whether each row's logits equal its logits in
the batch of 4; whether a row run alone equals its row in the batch; whether a context
prepared for that row alone gives the same logits as its slice of the batch's context; and
saves the logits so that a run at another thread count can be compared (--compare).

    OMP_NUM_THREADS=1 python scripts/forward_row_invariance.py --threads 1 --dtype bfloat16
    OMP_NUM_THREADS=2 python scripts/forward_row_invariance.py --threads 2 --dtype bfloat16 --compare
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--save", default="/tmp/forward_rows_{dtype}_{threads}.pt")
    parser.add_argument("--compare", action="store_true", help="compare with the 1-thread run's saved logits")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
    from amused_random import random_amused

    from musefast.cpu import linear as cpu_engine
    from musefast.sampling.cache import batch_slice

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = random_amused("amused-256", "cpu", dtype)
    cpu_engine.apply_default(pipe.transformer)
    model, cfg = pipe.transformer, pipe.transformer.config
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 77, cfg.encoder_hidden_size, generator=gen).to(dtype)
    pooled = torch.randn(4, cfg.cond_embed_dim, generator=gen).to(dtype)
    micro = torch.tensor([256.0, 256, 0, 0, 6], dtype=dtype)
    context = model.prepare_context(hidden, pooled, micro)
    tokens = torch.randint(0, cfg.codebook_size, (4, 16, 16), generator=gen)
    tokens = tokens.masked_fill(torch.rand(4, 16, 16, generator=gen) < 0.6, model.mask_token_id)
    report = {"dtype": args.dtype, "threads": args.threads}
    with torch.no_grad():
        full = model(tokens, context=context)
        for b in (1, 2, 3):
            part = model(tokens[:b], context=batch_slice(context, slice(0, b)))
            report[f"rows_of_{b}_equal_batch_of_4"] = all(torch.equal(part[i], full[i]) for i in range(b))
        alone = model(tokens[2:3], context=batch_slice(context, slice(2, 3)))
        report["row_alone_equals_batch"] = torch.equal(alone[0], full[2])
        own = model(tokens[2:3], context=model.prepare_context(hidden[2:3], pooled[2:3], micro))
        report["own_context_equals_batch_context"] = torch.equal(own[0], full[2])
    torch.save(full, args.save.format(dtype=args.dtype, threads=args.threads))
    if args.compare:
        one = torch.load(args.save.format(dtype=args.dtype, threads=1))
        report["equals_1_thread"] = torch.equal(one, full)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
