"""The ``musefast`` command line: generate | inpaint | outpaint | edit | batch | serve | doctor | train-demo.

Every value is checked before the model loads (``musefast.cli_checks``); a mistake prints one
line naming it and the fix and exits with code 2, a model that cannot be loaded or a run that
fails exits with 1. Tracebacks only with ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import warnings
from pathlib import Path

from musefast import cli_checks as checks
from musefast.cli_checks import UsageError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DEMO_INDEX = Path(__file__).resolve().parent / "assets" / "demo" / "model_index.json"
# Seeds the CLI draws are short enough to type back.
_DRAWN_SEEDS = 2**31


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, so ``--help`` answers "what if I leave it out".

    A help text that already says ``(default: ...)`` in words is kept as written (a ``None`` often
    means "the model's setting", which only the text can say); otherwise the value is appended:
    ``off`` for flags, ``none`` for an unset value; a required option says so instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.nargs == 0 and action.const is not True:  # store_const aliases such as --quick
            return text
        if action.nargs == 0:
            default = "on" if action.default else "off"
        elif action.default is None:
            default = "none"
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".strip()


class CommandError(RuntimeError):
    """A run that cannot go on (model not loadable, bad image file): exit code 1, one line."""


# -- commands -----------------------------------------------------------------------------

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
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB" if what == "image" else "L")
    except (OSError, UnidentifiedImageError) as exc:  # PIL's messages do not always name the file
        raise UsageError(f"cannot read {what} {path}: {exc}") from None


def _load(args):
    import torch

    from musefast import load

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        return load(args.model, device=args.device, dtype=dtype, quantize=args.quantize)
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one line (--debug: traceback)
        if args.debug:
            raise
        named = args.model in str(exc) or str(Path(args.model).absolute()) in str(exc)
        raise CommandError(f"cannot load model: {exc}" if named else f"cannot load model {args.model!r}: {exc}") from None


def _settings_of(pipe) -> dict:
    """The decoding defaults the run falls back to (for the PNG metadata)."""
    s = getattr(pipe, "settings", None)
    if s is None:  # aMUSEd, Meissonic: their family's defaults, as the generation engine's adapter knows them
        from musefast.generation import Request, adapter_for

        adapter = adapter_for(pipe)
        family = adapter.defaults(Request(prompt="the family's defaults"))
        return {"steps": family["num_steps"], "guidance_scale": family["guidance_scale"],
                "sampler": adapter.sampler_label()}
    return {"steps": s.num_steps, "guidance_scale": s.guidance_scale, "sampler": s.preset,
            "edit_iterations": s.edit_iterations, "edit_fraction": s.edit_fraction,
            "edit_guidance_scale": s.edit_guidance_scale}


def _save(images, args, params: dict) -> None:
    from musefast import __version__
    from musefast.image_metadata import save_image

    images = list(images)
    paths = checks.numbered_paths(args.output, len(images))
    for i, (image, path) in enumerate(zip(images, paths)):
        meta = params(i, image) if callable(params) else {
            **params, "index": i, "size": f"{image.width}x{image.height}", "version": __version__}
        save_image(image, path, meta)
        print(path)


def _common_kwargs(args) -> dict:
    kw = dict(seed=args.seed, negative_prompt=args.negative, progress=not args.quiet)
    if getattr(args, "steps", None) is not None:
        kw["num_steps"] = args.steps
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.cache is not None:
        kw["cache"] = args.cache
    return kw


def _params(args, pipe, command: str, **extra) -> dict:
    s = _settings_of(pipe)
    params = {"command": command, "prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed,
              "steps": args.steps if getattr(args, "steps", None) is not None else s["steps"],
              "guidance_scale": args.guidance if args.guidance is not None else s["guidance_scale"],
              "sampler": s["sampler"], "model": args.model, "cache": getattr(args, "cache", None)}
    return {**params, **extra}


def _run(args, pipe, call, params: dict) -> int:
    from musefast.ops import BackendUnavailableError

    if args.seed_drawn and not args.quiet:
        print(f"seed: {args.seed}", file=sys.stderr)
    try:
        images = call()
    except (ValueError, TypeError, BackendUnavailableError) as exc:  # sizes, masks, backends
        if args.debug:
            raise
        raise UsageError(str(exc)) from None
    _save(images, args, params)
    return 0


def _generate(args) -> int:
    """Image ``i`` of ``-n N`` has seed ``SEED + i``: each image is the one-image run of its seed
    (``musefast serve`` follows the same rule), and its PNG says how to make it alone."""
    from musefast.generation import Request, adapter_for
    from musefast.image_metadata import generation_params

    pipe = _load(args)
    adapter = adapter_for(pipe)
    if args.seed + args.num_images - 1 > checks.MAX_SEED:
        raise UsageError(f"--seed {args.seed} with -n {args.num_images}: image i takes seed SEED + i, which must "
                         f"stay <= {checks.MAX_SEED}")
    seeds = [args.seed + i for i in range(args.num_images)]
    base = adapter.resolve(Request(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed,
                                   num_steps=args.steps, guidance_scale=args.guidance, cache=args.cache), args.model)
    sampler = adapter.sampler_label()
    kw = {**_common_kwargs(args), "seed": seeds if len(seeds) > 1 else args.seed}
    return _run(args, pipe, lambda: pipe(args.prompt, num_images_per_prompt=args.num_images, **kw),
                lambda i, image: generation_params(base.replace(seed=seeds[i]), image, sampler=sampler))


def _inpaint(args) -> int:
    image, mask = _open_image(args.image, "image"), _open_image(args.mask, "mask")
    pipe = _load(args)
    return _run(args, pipe, lambda: pipe.inpaint(image, mask, args.prompt, resize=args.resize, **_common_kwargs(args)),
                _params(args, pipe, "inpaint", image=args.image, mask=args.mask))


def _outpaint(args) -> int:
    image = _open_image(args.image, "image")
    pipe = _load(args)
    sides = dict(left=args.left, right=args.right, top=args.top, bottom=args.bottom)
    return _run(args, pipe, lambda: pipe.outpaint(image, args.prompt, resize=args.resize, **sides,
                                                  **_common_kwargs(args)),
                _params(args, pipe, "outpaint", image=args.image, **sides))


def _edit(args) -> int:
    image = _open_image(args.image, "image")
    pipe = _load(args)
    s = _settings_of(pipe)
    kw = _common_kwargs(args)
    params = _params(args, pipe, "edit", image=args.image, steps=None,
                     guidance_scale=args.guidance if args.guidance is not None else s.get("edit_guidance_scale"),
                     iterations=args.iterations or s.get("edit_iterations"),
                     fraction=args.fraction or s.get("edit_fraction"))
    return _run(args, pipe, lambda: pipe.edit(image, args.prompt, iterations=args.iterations, fraction=args.fraction,
                                              resize=args.resize, **kw), params)


def _batch(args) -> int:
    import torch

    from musefast.batch import batch_generate

    try:
        summary = batch_generate(
            args.prompts, args.output, model=args.model, batch_size=args.batch_size, seed=args.seed,
            num_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative, size=args.size,
            format=args.format,
            shard_size=args.shard_size, overwrite=args.overwrite, deterministic=args.deterministic,
            device=args.device, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None, backend=args.backend,
            ray=args.ray, ray_address=args.ray_address, workers=args.workers,
            cpus_per_worker=args.cpus_per_worker, progress=not args.quiet)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise SystemExit(f"musefast batch: {exc}") from None
    return 0 if summary["failed"] == 0 else 1


def _add_batch(sub) -> None:
    b = sub.add_parser("batch", help="one image per row of a prompts file, resumable (manifest.jsonl)")
    b.add_argument("prompts", help=".txt (a prompt a line), .jsonl, .csv or .parquet with a 'prompt' column and "
                                   "optional id, seed, negative_prompt, num_steps, guidance_scale")
    b.add_argument("-o", "--output", required=True, help="output folder (images/, manifest.jsonl, errors.jsonl)")
    b.add_argument("--model", default="demo", help='"demo", a pipeline folder, or a hub id')
    b.add_argument("--steps", type=int, default=None,
                   help="decoding steps for rows without num_steps (default: the model's setting)")
    b.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for rows without one (default: the model's setting)")
    b.add_argument("--negative", default=None, help="negative prompt for rows without one")
    b.add_argument("--seed", type=int, default=0, help="global seed: rows without a seed get hash(id, seed)")
    b.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    b.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: 8 CPU, 32 GPU)")
    b.add_argument("--format", default="png", choices=["png", "webdataset"],
                   help="png: images/<id>.png; webdataset: tar shards in shards/")
    b.add_argument("--shard-size", type=int, default=1000, help="images per webdataset tar shard")
    b.add_argument("--overwrite", action="store_true", help="regenerate rows whose settings changed")
    b.add_argument("--deterministic", action="store_true",
                   help="run each row alone so batch size cannot change a token (slower)")
    b.add_argument("--ray", action="store_true", help="run on a local Ray (pip install -e '.[distributed]')")
    b.add_argument("--ray-address", default=None,
                   help="run on the Ray cluster at ADDR (e.g. auto, ray://host:10001) (default: none, no cluster)")
    b.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, or per "
                                                               "--cpus-per-worker cores)")
    b.add_argument("--cpus-per-worker", type=int, default=2, help="CPU cores (torch threads) per Ray actor")
    b.add_argument("--backend", default=None,
                   help="force one backend for every op, e.g. reference (default: the fastest usable)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype (default: as saved)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    b.set_defaults(func=_batch)


def _serve(args) -> int:
    try:
        from musefast.serve.config import Limits, ServerConfig
        from musefast.serve.run import ServeError, serve
    except ImportError as exc:
        raise CommandError(f"the server needs the serve extra: pip install 'musefast[serve]' ({exc})") from None
    try:
        config = ServerConfig(
            model=args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
            api_key=args.api_key, cors=tuple(args.cors), grace=args.grace, request_timeout=args.timeout,
            log_requests=args.log_requests, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
            threads=args.threads, limits=Limits(max_body_bytes=args.max_body_mb * 1024 * 1024))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if args.log_requests is not None:
        checks_dir = Path(args.log_requests).expanduser().parent
        if not checks_dir.is_dir():
            raise UsageError(f"--log-requests {args.log_requests}: folder {checks_dir} does not exist")
    if args.ray or args.ray_address:
        try:
            from musefast.serve.ray_serve import deploy
        except ImportError as exc:
            raise CommandError(f"Ray Serve support is not available ({exc}); install it with "
                               "pip install 'musefast[distributed,serve]'") from None
        return deploy(config, replicas=args.replicas, address=args.ray_address)
    _set_threads(args)
    try:
        return serve(config)
    except ServeError as exc:
        raise CommandError(str(exc)) from None


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible image server (POST /v1/images/generations) with a web page")
    s.add_argument("model", nargs="?", default="demo", help='"demo", a pipeline folder, or a hub id (default: demo)')
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback warns unless an API key is set")
    s.add_argument("--port", type=checks.non_negative_int, default=8000, help="port (0: any free port)")
    s.add_argument("--max-batch", type=checks.positive_int, default=8, metavar="N",
                   help="images decoded together in each step (continuous batching)")
    s.add_argument("--max-queue", type=checks.positive_int, default=64, metavar="N",
                   help="images waiting for a place in the batch; beyond it requests get 429 with Retry-After")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="Bearer key every /v1 route asks for (default: MUSEFAST_API_KEY if set, else no key)")
    s.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN; repeat for more (default: none, CORS off)")
    s.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds to finish in-flight requests before failing them")
    s.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-request time limit in seconds")
    s.add_argument("--max-body-mb", type=checks.positive_int, default=16, metavar="MB",
                   help="largest request body (uploads of edits) in MiB; larger ones get 413")
    s.add_argument("--log-requests", default=None, metavar="FILE",
                   help="append one JSON line per request (id, timings, settings, outcome) (default: none)")
    s.add_argument("--ray", action="store_true", help="serve on a local Ray Serve, one engine per replica")
    s.add_argument("--replicas", type=checks.positive_int, default=1, metavar="N", help="Ray Serve replicas")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="deploy on the Ray cluster at ADDR (e.g. auto) (default: none, a local Ray with --ray)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    s.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype (default: as saved)")
    s.add_argument("--threads", type=checks.positive_int, default=None, metavar="N",
                   help="CPU threads of torch (default: 1 for the demo model, else torch's default)")
    s.set_defaults(func=_serve)


def _train_demo(args) -> int:
    from musefast.training.demo import run

    return run(args)


# -- checks before the model loads ----------------------------------------------------------

def _from_png(args) -> None:
    """``--from-png``: the stored parameters fill every option not given on the command line."""
    from musefast.image_metadata import read_params

    path = Path(args.from_png)
    if not path.is_file():
        raise UsageError(f"--from-png {args.from_png}: file not found")
    try:
        params = read_params(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from-png {args.from_png}: cannot read its parameters ({exc})") from None
    if not params:
        raise UsageError(f"--from-png {args.from_png}: no musefast parameters in this image "
                         "(only PNGs written by musefast carry them)")
    if params.get("command", "generate") != "generate":
        raise UsageError(f"--from-png {args.from_png}: made by 'musefast {params['command']}'; "
                         "--from-png regenerates images of 'musefast generate'")
    for name, key in (("prompt", "prompt"), ("negative", "negative_prompt"), ("seed", "seed"), ("steps", "steps"),
                      ("guidance", "guidance_scale"), ("cache", "cache")):
        if getattr(args, name) is None:
            setattr(args, name, params.get(key))
    if args.model_given is None and params.get("model"):
        args.model = params["model"]
    if int(params.get("num_images", 1)) > 1 and int(params.get("index", 0)) > 0 and "request" not in params:
        # before 'image i takes seed SEED + i', the images of one -n call shared their seed
        raise UsageError(f"--from-png {args.from_png}: image {params['index']} of a 'musefast generate -n "
                         f"{params['num_images']}' call made by musefast {params.get('version', '?')}, whose images "
                         "shared one seed; regenerate it with that version")


def _check(args, parser) -> None:
    """Everything that can be checked without the model."""
    if args.func is _generate:
        if args.from_png:
            _from_png(args)
        if args.prompt is None:
            raise UsageError("give a PROMPT, or --from-png IMAGE to regenerate an image")
        if args.num_images_given is not None:
            args.num_images = args.num_images_given
    prompt = getattr(args, "prompt", None)
    if isinstance(prompt, str) and not prompt.strip():  # the rule of the generation engine's Request and of batch rows
        raise UsageError(f"PROMPT must be a non-empty caption, got {prompt!r}")
    if args.func is _edit and args.steps is not None:
        raise UsageError("--steps does not apply to edit (each iteration is one step); use --iterations")
    if args.func is _outpaint and args.left + args.right + args.top + args.bottom == 0:
        raise UsageError("outpaint needs a margin: --left, --right, --top or --bottom (pixels)")
    for name in ("image", "mask"):
        if getattr(args, name, None) is not None and not Path(getattr(args, name)).is_file():
            raise UsageError(f"{name} file not found: {getattr(args, name)}")
    args.output = checks.output_path(args.output)
    args.device = checks.device(args.device)
    if args.model_given is not None:
        args.model = args.model_given
    args.seed_drawn = args.seed is None
    if args.seed_drawn:  # printed when the run starts; always written into the PNG
        args.seed = secrets.randbelow(_DRAWN_SEEDS)


# -- parser ---------------------------------------------------------------------------------

def _demo_settings() -> dict:
    try:
        return json.loads(_DEMO_INDEX.read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return {}


def _add_common(p: argparse.ArgumentParser, demo: dict, *, steps: bool = True, guidance_key="guidance_scale") -> None:
    def model_default(key):
        return f"the model's setting; demo: {demo[key]}" if key in demo else "the model's setting"

    p.add_argument("-o", "--output", default="out.png", metavar="FILE",
                   help="output image (.png keeps the parameters; several images: FILE_0.png, FILE_1.png, ...) "
                        "(default: %(default)s)")
    p.add_argument("--model", dest="model_given", default=None, metavar="NAME",
                   help='"demo" (embedded), a pipeline folder, or a hub id owner/name (default: demo)')
    if steps:
        p.add_argument("--steps", type=checks.positive_int, default=None, metavar="N",
                       help=f"decoding steps of the base stage (default: {model_default('num_steps')})")
    p.add_argument("--guidance", type=checks.guidance, default=None, metavar="G",
                   help=f"classifier-free guidance scale; <= 1 turns guidance off "
                        f"(default: {model_default(guidance_key)})")
    p.add_argument("--seed", type=checks.seed, default=None, metavar="N",
                   help="random seed; the same seed and settings give the same image "
                        "(default: drawn at random and printed as 'seed: N')")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (default: none)")
    p.add_argument("--cache", default=None, choices=["fast"],
                   help="step cache: cheap steps reuse the K/V of decoded tokens (default: none, exact decoding)")
    p.add_argument("--backend", default=None,
                   help="force one backend for every op, e.g. reference, or op=name pairs (default: the fastest usable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: as saved, float32 for demo)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="run the transformer's linears in int8 (CPU with VNNI; close to the float result, not "
                        "equal) (default: off)")
    p.add_argument("--threads", type=checks.positive_int, default=None, metavar="N",
                   help="CPU threads of torch (default: 1 for the demo model, whose matrices are too small to "
                        "share between cores; torch's default, or OMP_NUM_THREADS, for other models)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the output paths: no progress bar, seed or notes (warnings still go to stderr)")
    p.add_argument("--wait-for-build", action="store_true",
                   help="on first use, wait for the C++ kernels to compile instead of compiling them in the "
                        "background and running this command on the PyTorch backends")
    p.set_defaults(model="demo")


def _add_resize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", action="store_true",
                   help="resize the image (and mask) to the model's size first, and the result back "
                        "(default: the image must have the model's size)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from musefast import __version__

    demo = _demo_settings()
    parser = argparse.ArgumentParser(prog="musefast", description="Muse-style masked generative image models, fast.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"musefast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor_p = sub.add_parser("doctor", help="show what was built and which backends are usable")
    doctor_p.add_argument("--selftest", action="store_true",
                          help="compare every usable backend with the reference now; exit code 1 on any failure")
    doctor_p.add_argument("--device", default=None,
                          help="device to self-test (default: cuda if available, else cpu)")
    doctor_p.set_defaults(func=_doctor)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", help="what to draw (the demo's vocabulary: docs/models.md)")
    g.add_argument("-n", "--num-images", dest="num_images_given", type=checks.positive_int, default=None,
                   metavar="N", help="images for the prompt; image i takes seed SEED + i, so each is the one-image "
                        "run of its seed (default: 1)")
    g.add_argument("--from-png", default=None, metavar="IMAGE",
                   help="regenerate a PNG written by musefast generate, from the parameters stored in it "
                        "(options given here override them) (default: none)")
    _add_common(g, demo)
    g.set_defaults(func=_generate, num_images=1)

    i = sub.add_parser("inpaint", help="repaint the white region of MASK following PROMPT")
    i.add_argument("image", help="the image to change")
    i.add_argument("mask", help="white (nonzero) = repaint, black = keep; same size as IMAGE")
    i.add_argument("prompt", help="what to draw in the masked region")
    _add_resize(i)
    _add_common(i, demo)
    i.set_defaults(func=_inpaint)

    o = sub.add_parser("outpaint", help="grow the canvas and fill the new region")
    o.add_argument("image", help="the image to extend")
    o.add_argument("prompt", help="what the grown canvas shows")
    for side in ("left", "right", "top", "bottom"):
        o.add_argument(f"--{side}", type=checks.non_negative_int, default=0, metavar="PX",
                       help=f"pixels added on the {side} (default: %(default)s)")
    _add_resize(o)
    _add_common(o, demo)
    o.set_defaults(func=_outpaint)

    e = sub.add_parser("edit", help="mask-free editing towards PROMPT")
    e.add_argument("image", help="the image to edit")
    e.add_argument("prompt", help="what the edited image should show")
    e.add_argument("--iterations", type=checks.positive_int, default=None, metavar="N",
                   help="rounds of resampling, one decoding step each (default: the model's setting"
                        + (f"; demo: {demo['edit_iterations']})" if "edit_iterations" in demo else ")"))
    e.add_argument("--fraction", type=checks.fraction, default=None, metavar="F",
                   help="fraction of tokens resampled per iteration (default: the model's setting"
                        + (f"; demo: {demo['edit_fraction']})" if "edit_fraction" in demo else ")"))
    _add_resize(e)
    _add_common(e, demo, steps=False, guidance_key="edit_guidance_scale")
    # --steps is rejected with a pointer to --iterations rather than argparse's "unrecognized"
    e.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    e.set_defaults(func=_edit)

    _add_batch(sub)
    _add_serve(sub)

    t = sub.add_parser("train-demo", help="train the demo model from scratch (a pipeline folder)")
    words = sys.argv[1:] if argv is None else argv
    if "train-demo" in words:
        # imported only when asked for: the other commands must not depend on the training code
        from musefast.training.demo import add_arguments

        add_arguments(t)
    t.set_defaults(func=_train_demo)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
        command.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    return parser


# -- running --------------------------------------------------------------------------------

def _first_build_in_background(quiet: bool) -> None:
    """On first use the C++ kernels would compile for a minute or two before the first image:
    compile them in a background process instead and run this command on the PyTorch backends
    (the demo model is small enough that they take seconds). The next command uses the kernels."""
    from musefast import _build

    if _build.needs_first_build():
        log = _build.build_in_background()
        if not quiet:
            print(f"musefast: compiling the C++ kernels in the background (first use; progress in {log}); "
                  "this run uses the PyTorch backends. --wait-for-build waits for them instead.", file=sys.stderr)


def _set_threads(args) -> None:
    """The demo's 64-wide layers run a 12-step generation in tens of milliseconds: a second
    thread only adds synchronisation, and on a busy machine it waits for a core (measured:
    2.0-2.2 s with 1 thread against 3.1-8.3 s with 2 for the whole command, 2-core machine)."""
    import os

    threads = args.threads
    on_cpu = args.device is None or args.device.startswith("cpu")
    if threads is None and args.model == "demo" and on_cpu and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"musefast: warning: {message}", file=sys.stderr)


def _execute(args, parser) -> int:
    if args.func not in (_generate, _inpaint, _outpaint, _edit):
        return args.func(args)
    import torch

    _check(args, parser)
    previous_threads = torch.get_num_threads()
    _set_threads(args)
    from musefast import _build_progress

    try:
        with _build_progress.quiet(args.quiet):  # -q: no build lines either (doctor still times the build)
            return _with_backend(args)
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers keep their setting


def _with_backend(args) -> int:
    import os

    backend = args.backend
    if not backend and not args.wait_for_build:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)  # argparse's own usage errors exit with 2
    where = f"musefast {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return _execute(args, parser)
        except UsageError as exc:
            if args.debug:
                raise
            print(f"{where}: error: {exc}", file=sys.stderr)
            return 2
        except CommandError as exc:
            print(f"{where}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{where}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - no traceback unless asked for
            if args.debug:
                raise
            print(f"{where}: error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
