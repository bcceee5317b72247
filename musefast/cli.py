"""The ``musefast`` command line: generate | inpaint | outpaint | edit | doctor | train-demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _doctor(args: argparse.Namespace) -> int:
    from musefast import doctor

    if args.selftest:
        from musefast.ops import selfcheck

        results = selfcheck.selftest(args.device)
        print(selfcheck.format_results(results, args.device))
        return 1 if any(r.status == "FAIL" for r in results) else 0
    print(doctor())
    return 0


def _open_image(path: str, what: str):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"musefast: {what} file not found: {path}")
    try:
        return Image.open(p).convert("RGB" if what == "image" else "L")
    except Exception as exc:  # PIL's errors do not name the file
        raise SystemExit(f"musefast: cannot read {what} {path}: {exc}") from None


def _load(args):
    import torch

    from musefast import load

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        return load(args.model, device=args.device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"musefast: cannot load model {args.model!r}: {exc}") from None


def _save(images, output: str) -> None:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        print(out)
        return
    for i, image in enumerate(images):
        path = out.with_name(f"{out.stem}_{i}{out.suffix}")
        image.save(path)
        print(path)


def _common_kwargs(args) -> dict:
    kw = dict(seed=args.seed, backend=args.backend, negative_prompt=args.negative, progress=not args.quiet)
    if args.steps is not None:
        kw["num_steps"] = args.steps
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.cache is not None:
        kw["cache"] = args.cache
    return kw


def _run(args, call) -> int:
    from musefast.ops import BackendUnavailableError

    try:
        images = call()
    except (ValueError, BackendUnavailableError) as exc:  # bad sizes, masks, backends: no traceback
        raise SystemExit(f"musefast {args.command}: {exc}") from None
    _save(images, args.output)
    return 0


def _generate(args) -> int:
    pipe = _load(args)
    return _run(args, lambda: pipe(args.prompt, num_images_per_prompt=args.num_images, **_common_kwargs(args)))


def _inpaint(args) -> int:
    image, mask = _open_image(args.image, "image"), _open_image(args.mask, "mask")
    pipe = _load(args)
    return _run(args, lambda: pipe.inpaint(image, mask, args.prompt, **_common_kwargs(args)))


def _outpaint(args) -> int:
    image = _open_image(args.image, "image")
    pipe = _load(args)
    return _run(args, lambda: pipe.outpaint(image, args.prompt, left=args.left, right=args.right, top=args.top,
                                            bottom=args.bottom, **_common_kwargs(args)))


def _edit(args) -> int:
    image = _open_image(args.image, "image")
    pipe = _load(args)
    if args.steps is not None:
        raise SystemExit("musefast edit: --steps does not apply (each iteration is one step); use --iterations")
    kw = _common_kwargs(args)
    return _run(args, lambda: pipe.edit(image, args.prompt, iterations=args.iterations, fraction=args.fraction, **kw))


def _batch(args) -> int:
    import torch

    from musefast.batch import batch_generate

    try:
        summary = batch_generate(
            args.prompts, args.output, model=args.model, batch_size=args.batch_size, seed=args.seed,
            num_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative, format=args.format,
            shard_size=args.shard_size, overwrite=args.overwrite, deterministic=args.deterministic,
            device=args.device, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None, backend=args.backend,
            ray=args.ray, ray_address=args.ray_address, workers=args.workers,
            cpus_per_worker=args.cpus_per_worker, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"musefast batch: {exc}") from None
    return 0 if summary["failed"] == 0 else 1


def _add_batch(sub) -> None:
    b = sub.add_parser("batch", help="one image per row of a prompts file, resumable (manifest.jsonl)")
    b.add_argument("prompts", help=".txt (a prompt a line), .jsonl, .csv or .parquet with a 'prompt' column and "
                                   "optional id, seed, negative_prompt, num_steps, guidance_scale")
    b.add_argument("-o", "--output", required=True, help="output folder (images/, manifest.jsonl, errors.jsonl)")
    b.add_argument("--model", default="demo", help='"demo", a pipeline folder, or a hub id')
    b.add_argument("--steps", type=int, default=None, help="decoding steps for rows without num_steps")
    b.add_argument("--guidance", type=float, default=None, help="guidance scale for rows without one")
    b.add_argument("--negative", default=None, help="negative prompt for rows without one")
    b.add_argument("--seed", type=int, default=0, help="global seed: rows without a seed get hash(id, seed)")
    b.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: 8 CPU, 32 GPU)")
    b.add_argument("--format", default="png", choices=["png", "webdataset"])
    b.add_argument("--shard-size", type=int, default=1000, help="images per webdataset tar shard")
    b.add_argument("--overwrite", action="store_true", help="regenerate rows whose settings changed")
    b.add_argument("--deterministic", action="store_true",
                   help="run each row alone so batch size cannot change a token (slower)")
    b.add_argument("--ray", action="store_true", help="run on a local Ray (pip install -e '.[distributed]')")
    b.add_argument("--ray-address", default=None, help="run on the Ray cluster at ADDR (e.g. auto, ray://host:10001)")
    b.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, or per "
                                                               "--cpus-per-worker cores)")
    b.add_argument("--cpus-per-worker", type=int, default=2, help="CPU cores (torch threads) per Ray actor")
    b.add_argument("--backend", default=None, help="force one backend for every op (e.g. reference)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    b.set_defaults(func=_batch)


def _train_demo(args) -> int:
    from musefast.training.demo import run

    return run(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="out.png", help="output image path (suffix _i for several)")
    p.add_argument("--model", default="demo", help='"demo", a pipeline folder, or a hub id')
    p.add_argument("--steps", type=int, default=None, help="decoding steps of the base stage")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--cache", default=None, choices=["fast"],
                   help="step cache: cheap steps reuse the K/V of decoded tokens (default: exact decoding)")
    p.add_argument("--backend", default=None, help="force one backend for every op (e.g. reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait-for-build", action="store_true",
                   help="on first use, wait for the C++ kernels to compile instead of compiling them in the "
                        "background and running this command on the PyTorch backends")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musefast", description="Muse-style masked generative image models, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor_p = sub.add_parser("doctor", help="show what was built and which backends are usable")
    doctor_p.add_argument("--selftest", action="store_true",
                          help="compare every usable backend with the reference now; exit code 1 on any failure")
    doctor_p.add_argument("--device", default=None, help="device to self-test (default: cuda if available, else cpu)")
    doctor_p.set_defaults(func=_doctor)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("-n", "--num-images", type=int, default=1)
    _add_common(g)
    g.set_defaults(func=_generate)

    i = sub.add_parser("inpaint", help="repaint the white region of MASK following PROMPT")
    i.add_argument("image")
    i.add_argument("mask")
    i.add_argument("prompt")
    _add_common(i)
    i.set_defaults(func=_inpaint)

    o = sub.add_parser("outpaint", help="grow the canvas and fill the new region")
    o.add_argument("image")
    o.add_argument("prompt")
    for side in ("left", "right", "top", "bottom"):
        o.add_argument(f"--{side}", type=int, default=0, help=f"pixels added on the {side}")
    _add_common(o)
    o.set_defaults(func=_outpaint)

    e = sub.add_parser("edit", help="mask-free editing towards PROMPT")
    e.add_argument("image")
    e.add_argument("prompt")
    e.add_argument("--iterations", type=int, default=None)
    e.add_argument("--fraction", type=float, default=None, help="fraction of tokens resampled per iteration")
    _add_common(e)
    e.set_defaults(func=_edit)

    _add_batch(sub)

    t = sub.add_parser("train-demo", help="train the demo model from scratch (a pipeline folder)")
    words = sys.argv[1:] if argv is None else argv
    if "train-demo" in words:
        # imported only when asked for: the other commands must not depend on the training code
        from musefast.training.demo import add_arguments

        add_arguments(t)
    t.set_defaults(func=_train_demo)
    return parser


def _first_build_in_background(quiet: bool) -> None:
    """On first use the C++ kernels would compile for a minute or two before the first image:
    compile them in a background process instead and run this command on the PyTorch backends
    (the demo model is small enough that they take seconds). The next command uses the kernels."""
    from musefast import _build

    if _build.needs_first_build():
        log = _build.build_in_background()
        if not quiet:
            print(f"musefast: compiling the C++ kernels in the background (first use, about 1-2 min; log: {log}); "
                  "this run uses the PyTorch backends. --wait-for-build waits for them instead.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser(argv).parse_args(argv)
    backend = getattr(args, "backend", None)
    if args.func in (_generate, _inpaint, _outpaint, _edit) and not backend and not args.wait_for_build:
        _first_build_in_background(args.quiet)
    if not backend:
        return args.func(args)
    # Through the environment: it applies to every op that has a backend of that name
    # (attention inside the models too), and is restored afterwards for in-process callers.
    previous = os.environ.get("MUSEFAST_BACKEND")
    os.environ["MUSEFAST_BACKEND"] = backend
    args.backend = None
    try:
        return args.func(args)
    finally:
        if previous is None:
            del os.environ["MUSEFAST_BACKEND"]
        else:
            os.environ["MUSEFAST_BACKEND"] = previous


if __name__ == "__main__":
    sys.exit(main())
