"""The steps of scripts/gpu_check.py, one per subprocess: ``python gpu_check_steps.py STEP
--result FILE [--rehearse] [--out DIR]`` writes {"status", "figures", "error"} to FILE.

status is "pass", "fail" or "skipped" (with the reason in "error"). On a GPU the sizes are
budgeted real ones; ``--rehearse`` runs the same code on CPU at tiny sizes. Timings are medians
of CUDA-event-timed loops after warm-up on a GPU and perf_counter loops on CPU
(benchmarks/timing.py); every musefast figure sits next to its anchor from the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


class Skip(Exception):
    """The step cannot run here (its reason is reported, the step is not a failure)."""


class StepFailed(Exception):
    """The step ran and found a failure; the figures it measured are still reported."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


_PARTIAL: Path | None = None  # the result file, written after each measurement
_LAST: dict = {}  # the figures of the last checkpoint, reported when the step then fails
_WHEELHOUSE: Path | None = None  # --wheelhouse: the carried wheels


def checkpoint(figures: dict, line: str | None = None) -> None:
    """Save the figures measured so far: a step killed at its timeout or failing later still
    reports them. ``line`` (what was just measured) goes to the output at once: the log and
    the console show a step's progress while it runs."""
    global _LAST
    _LAST = figures
    if line is not None:
        print(line, flush=True)
    if _PARTIAL is not None:
        _PARTIAL.write_text(json.dumps({"status": "fail", "figures": figures, "error": "did not finish"},
                                       default=str))


def _brief(figures: dict) -> str:
    """One line of what was just measured (numbers to 4 significant digits)."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
                     if not isinstance(v, (dict, list)))


def _time(fn, rehearse: bool, warmup: int = 3) -> float:
    from timing import seconds_per_call

    return seconds_per_call(fn, DEVICE, min_seconds=0.02 if rehearse else 0.2, warmup=1 if rehearse else warmup)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(distribution: str):
    """Installed version, read from the package metadata (no import: some are slow to import)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# -- steps ---------------------------------------------------------------------------------

def _installed_from() -> str | None:
    """Where a fresh process imports ``musefast`` (with its ``musefast.kernels``) from."""
    proc = subprocess.run([sys.executable, "-c", "import musefast, musefast.kernels; print(musefast.__file__)"],
                          cwd="/", capture_output=True, text=True)
    return str(Path(proc.stdout.strip()).resolve().parent.parent) if proc.returncode == 0 else None


def _imported_here() -> str | None:
    """The same, in this process (its sys.path has no checkout folder: only an install finds it)."""
    try:
        import musefast
        import musefast.kernels  # noqa: F401  (mapped from kernels/ by an install only)
    except ImportError:
        return None
    return str(Path(musefast.__file__).resolve().parent.parent)


def wheels(rehearse: bool, out: Path) -> dict:
    """Install the carried wheels (scripts/make_wheelhouse.sh: diffusers and what it needs that
    the GPU image lacks) offline, before anything else: the comparison steps then find them.
    Dependencies are resolved against what is installed and the folder, never the network."""
    if _WHEELHOUSE is None:
        raise Skip("no --wheelhouse given")
    files = sorted(str(p) for p in _WHEELHOUSE.glob("*.whl"))
    if not files:
        raise RuntimeError(f"no .whl files in {_WHEELHOUSE} (prepare it with: bash scripts/make_wheelhouse.sh)")
    # requirements.txt names what to install; the other wheels are only used where the installed
    # packages do not satisfy it (a wheel named on the command line would replace the image's own)
    requirements = _WHEELHOUSE / "requirements.txt"
    wanted = ["-r", str(requirements)] if requirements.is_file() else files
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(_WHEELHOUSE),
                           "--no-cache-dir", "--no-compile", "--disable-pip-version-check", *wanted],
                          capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or [proc.stderr.strip()]
        raise RuntimeError(f"pip install --no-index from {_WHEELHOUSE} failed: {errors[-1][:400]}")
    return {"wheelhouse_files": [Path(f).name for f in files], "diffusers": _version("diffusers"),
            "requested": requirements.read_text().split() if requirements.is_file() else "every wheel"}


def install(rehearse: bool, out: Path) -> dict:
    """An editable install of this checkout (a GPU machine starts bare): no dependencies, no
    build isolation, nothing compiled (the extension is built by the next step), no network."""
    before = _imported_here()
    if before == str(ROOT):
        return {"installed": "already: this checkout"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", str(ROOT)], capture_output=True, text=True)
    print(proc.stdout[-2000:], proc.stderr[-2000:])
    after = _installed_from()
    if after != str(ROOT):
        raise RuntimeError(f"pip install -e failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return {"installed": f"pip install -e (was: {before})"}


def env(rehearse: bool, out: Path) -> dict:
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True) if _which("nvcc") else None
    figures = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": _version("triton"),
        "transformers": _version("transformers"), "diffusers": _version("diffusers"),
        "flash_attn": _version("flash-attn"),
        "nvcc": nvcc.stdout.strip().splitlines()[-1] if nvcc and nvcc.returncode == 0 else None,
        "musefast_commit": commit_id(ROOT), "cuda_available": CUDA,
        "triton_fixed_config": os.environ.get("MUSEFAST_TRITON_FIXED_CONFIG") == "1",
    }
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    elif not rehearse:
        raise RuntimeError("no CUDA device: run with --rehearse on a machine without a GPU")
    return figures


def commit_id(root: Path) -> str:
    """The checked-out commit, read from .git's files (a GPU machine may have no git; a copied
    tree may have no .git): "unknown" when it cannot be read. Handles a worktree's .git file
    and packed refs."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head  # a detached HEAD holds the id itself
        ref = head.split(":", 1)[1].strip()
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return "unknown"


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def _compile_seconds(folder: Path) -> dict:
    """Seconds per compiled file of the last ninja build in ``folder`` (its .ninja_log): how a
    build would spread over more cores."""
    times = {}
    try:
        for line in (folder / ".ninja_log").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 4 and not line.startswith("#"):
                times[fields[3]] = round((int(fields[1]) - int(fields[0])) / 1e3, 1)
    except (OSError, ValueError):
        pass
    return times


def build(rehearse: bool, out: Path) -> dict:
    """Both parts of musefast._C (the rehearsal: the CPU part only; there is no GPU to build
    the CUDA part for), a line before and after each, and each file's compile time."""
    from musefast import _build, ops

    print(f"musefast._C CPU part: building {len(_build.sources())} sources unless cached ...", flush=True)
    start = time.perf_counter()
    module = _build.extension()
    print(f"musefast._C CPU part: {'loaded' if module is not None else _build.extension_error()} after "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    compile_s = {"cpu": _compile_seconds(_build.cache_dir())}
    if rehearse:
        status = {"built": module is not None, "error": _build.extension_error(),
                  "cuda_kernels": "not built in a rehearsal: no GPU to build them for"}
        status.update(module.build_info() if module is not None else {})
    else:
        print(f"musefast._C CUDA part: building {len(_build.sources(with_cuda=True))} sources unless cached ...",
              flush=True)
        start = time.perf_counter()
        status = _build.extension_status()  # builds the CUDA part now
        print(f"musefast._C CUDA part: {'loaded' if status['cuda_kernels'] else status['cuda_error']} after "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if CUDA:
            compile_s["cuda"] = _compile_seconds(_build.cache_dir(with_cuda=True))
    figures = {"extension": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                             for k, v in status.items()},
               "compile_s": compile_s, "backends": ops.backends(DEVICE)}
    if not status.get("built"):
        raise StepFailed(f"musefast._C was not built: {status.get('error')}", figures)
    if CUDA:  # the CUDA kernels must be there on a GPU machine, whatever the build reports
        missing = {op: table["cuda"] for op, table in figures["backends"].items()
                   if "cuda" in table and table["cuda"] != "ok"}
        if missing:
            raise StepFailed(f"CUDA kernels unusable: {missing}", figures)
    return figures


def selftest(rehearse: bool, out: Path) -> dict:
    """What ``musefast doctor --selftest`` runs (every usable backend of every op against the
    reference, verdicts re-recorded), each line printed and saved as its check finishes: a
    first run compiles every kernel, and a step cut short still says which checks passed."""
    from musefast.ops import selfcheck

    lines = [selfcheck.format_header(DEVICE)]
    print(lines[0], flush=True)

    def progress(result):
        lines.append(selfcheck.format_result(result))
        checkpoint({"lines": lines}, lines[-1])

    results = selfcheck.selftest(DEVICE, progress=progress)
    failed = [f"{r.op}/{r.backend}: {r.detail}" for r in results if r.status == "FAIL"]
    lines.append(selfcheck.format_results(results, DEVICE).splitlines()[-1])
    print(lines[-1], flush=True)
    figures = {"lines": lines, "passed": sum(r.status == "pass" for r in results), "failed": failed,
               "skipped": sum(r.status == "skip" for r in results)}
    if failed:
        raise StepFailed(f"{len(failed)} backend(s) disagree with the reference: {'; '.join(failed)[:400]}", figures)
    return figures


def pytest_gpu(rehearse: bool, out: Path) -> dict:
    import tempfile

    junit = out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "tests"]
    # A fresh Triton cache: every kernel this run needs is compiled here, and counted.
    with tempfile.TemporaryDirectory(prefix="musefast-triton-") as cache:
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TRITON_CACHE_DIR=cache))
        compiles = len(list(Path(cache).rglob("*.cubin")))
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}: {(problem.get('message') or '')[:300]}")
    figures = {**counts, "failed": failed[:60], "exit_code": proc.returncode, "triton_compiles": compiles,
               "fixed_triton_config": os.environ.get("MUSEFAST_TRITON_FIXED_CONFIG") == "1"}
    if proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        raise StepFailed(f"{counts['failures']} failed, {counts['errors']} errors of {counts['tests']}", figures)
    if not rehearse and counts["passed"] == 0:
        raise StepFailed("no gpu test ran on the GPU", figures)
    return figures


def _available(op: str, backends: list[str]) -> tuple[list[str], dict]:
    from musefast import ops

    table = ops.backends(DEVICE)[op]
    return [b for b in backends if table.get(b) == "ok"], {b: table.get(b) for b in backends if table.get(b) != "ok"}


def bench_vq(rehearse: bool, out: Path) -> dict:
    from musefast import ops

    if rehearse:
        cases, backends = [(256, 512, 64, torch.float32)], ["cpu", "triton", "reference"]
    else:
        cases = [(65536, 8192, 64, torch.float16), (65536, 8192, 64, torch.float32), (16384, 16384, 256, torch.float16)]
        backends = ["cuda", "triton"]
    runnable, unavailable = _available("vq_nearest", backends)
    figures = {"unavailable": unavailable, "cases": []}
    for n, k, d, dtype in cases:
        z = torch.randn(n, d, device=DEVICE, dtype=dtype)
        cb = torch.randn(k, d, device=DEVICE, dtype=dtype)
        row = {"N": n, "K": k, "D": d, "dtype": str(dtype)[6:]}
        row["cdist_argmin_ms"] = 1e3 * _time(lambda: torch.cdist(z, cb).argmin(1), rehearse)
        for b in runnable:
            ms = 1e3 * _time(lambda: ops.vq_nearest(z, cb, backend=b), rehearse)
            row[f"{b}_ms"] = ms
            row[f"{b}_speedup_vs_cdist"] = row["cdist_argmin_ms"] / ms
            row[f"{b}_tflops"] = 2.0 * n * k * d / (ms * 1e-3) / 1e12
        figures["cases"].append(row)
        checkpoint(figures, _brief(row))
    return figures


def bench_attention(rehearse: bool, out: Path) -> dict:
    import torch.nn.functional as F

    from musefast import ops

    if rehearse:
        dtype, cases, backends = torch.float32, [("self", 1, 2, 64, 64, 32, False)], ["triton", "sdpa", "reference"]
    else:
        dtype, backends = torch.float16, ["triton", "sdpa", "flash_attn"]
        # (kind, B, H, Lq, Lk, D, masked): aMUSEd-512's 1024 tokens and a long 4096 sequence at
        # width 1024, cross-attention over 77 text tokens of which ~half are padding
        cases = [("self", 16, 16, 1024, 1024, 64, False), ("self", 4, 16, 4096, 4096, 64, False),
                 ("self", 16, 8, 1024, 1024, 128, False), ("cross", 16, 16, 1024, 77, 64, True),
                 ("cross", 4, 16, 4096, 77, 64, True)]
    runnable, unavailable = _available("attention", backends)
    figures = {"unavailable": unavailable, "cases": []}
    for kind, b, h, lq, lk, d, masked in cases:
        q = torch.randn(b, h, lq, d, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(b, h, lk, d, device=DEVICE, dtype=dtype) for _ in range(2))
        mask = (torch.arange(lk, device=DEVICE)[None] < torch.randint(8, lk + 1, (b, 1), device=DEVICE)) if masked \
            else None
        row = {"kind": kind, "B": b, "H": h, "Lq": lq, "Lk": lk, "D": d, "masked": masked, "dtype": str(dtype)[6:]}
        row["torch_sdpa_ms"] = 1e3 * _time(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None, None, :]), rehearse)
        for name in runnable:
            ms = 1e3 * _time(lambda: ops.attention(q, k, v, key_padding_mask=mask, backend=name), rehearse)
            row[f"{name}_ms"] = ms
            row[f"{name}_speedup_vs_sdpa"] = row["torch_sdpa_ms"] / ms
            row[f"{name}_tflops_nominal"] = 4.0 * b * h * lq * lk * d / (ms * 1e-3) / 1e12
        figures["cases"].append(row)
        checkpoint(figures, _brief(row))
    return figures


def _diffusers_step(cond, uncond, g):
    if not _has("diffusers"):
        return None
    from test_bench_remask import _diffusers_step as diffusers_step  # benchmarks/: the same anchor

    return diffusers_step(cond, uncond, g)


def bench_remask(rehearse: bool, out: Path) -> dict:
    from musefast import ops

    if rehearse:
        dtype, cases, backends = torch.float32, [(1, 64, 256)], ["cpu", "triton", "reference"]
    else:
        dtype, cases, backends = torch.float16, [(1, 256, 8192), (8, 1024, 8192), (8, 4096, 8192)], \
            ["cuda", "triton", "reference"]
    runnable, unavailable = _available("cfg_sample_remask", backends)
    figures = {"unavailable": unavailable, "diffusers_anchor": _has("diffusers"), "cases": []}
    for b, n, k in cases:
        cond, uncond = (torch.randn(b, n, k, device=DEVICE, dtype=dtype) for _ in range(2))
        tokens = torch.zeros(b, n, dtype=torch.long, device=DEVICE)
        masked = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
        num = torch.full((b,), n * 253 // 256, device=DEVICE)
        row = {"B": b, "N": n, "K": k, "dtype": str(dtype)[6:], "guidance": 10.0}
        for name in runnable:
            if name == "reference" and b * n * k > (1 << 24) and not rehearse:
                continue  # the definition materialises B×N×K float64 intermediates: too slow to time here
            row[f"{name}_ms"] = 1e3 * _time(lambda: ops.cfg_sample_remask(
                cond, uncond, tokens=tokens, masked=masked, num_to_mask=num, guidance_scale=10.0,
                choice_temperature=2.0, seed=0, step=0, backend=name), rehearse)
        anchor = _diffusers_step(cond, uncond, 10.0)
        if anchor is not None:
            row["diffusers_step_ms"] = 1e3 * _time(anchor, rehearse)
        for name in runnable:
            if f"{name}_ms" in row and "diffusers_step_ms" in row:
                row[f"{name}_speedup_vs_diffusers"] = row["diffusers_step_ms"] / row[f"{name}_ms"]
        figures["cases"].append(row)
        checkpoint(figures, _brief(row))
    return figures


def decode_step(rehearse: bool, out: Path) -> dict:
    from amused_random import decoding_step, random_amused

    size, dtype = ("tiny", torch.float32) if rehearse else ("amused-256", torch.float16)
    pipe = random_amused(size, DEVICE, dtype)
    step, inputs = decoding_step(pipe, batch=1 if rehearse else 8)
    figures = {"size": size, "dtype": str(dtype)[6:], "batch": inputs[0].shape[0]}
    with torch.no_grad():
        eager = step(*inputs)
        figures["eager_ms"] = 1e3 * _time(lambda: step(*inputs), rehearse)
        if CUDA:  # before compiling, which may take the rest of the step's time
            try:
                graph_ms, equal = _cuda_graph_ms(step, inputs, eager, rehearse)
                figures.update(cuda_graph_ms=graph_ms, cuda_graph_equal_to_eager=equal)
            except Exception as exc:  # a step that cannot be captured is a finding: the step fails below
                figures["cuda_graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            figures["cuda_graph"] = "skipped: no CUDA device"
        checkpoint(figures, _brief(figures))
        # The whole step under torch.compile(fullgraph=True), as musefast promises; a step that only
        # compiles with graph breaks is reported as not compiling (its many small graphs would
        # cost more compile time than this step has). The rehearsal traces with the "eager"
        # backend: the capture is checked, not inductor's code generation.
        try:
            compiled = torch.compile(step, fullgraph=True, backend="eager" if rehearse else "inductor")
            got = compiled(*inputs)
            figures["compiled_equal_to_eager"] = all(torch.equal(a, b) for a, b in zip(got, eager))
            figures["compiled_ms"] = 1e3 * _time(lambda: compiled(*inputs), rehearse)
        except Exception as exc:  # recorded: the report says why the step does not compile
            figures["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        checkpoint(figures, _brief({k: v for k, v in figures.items() if k.startswith("compile")}))
    # (equality with eager is reported, not required: a captured cuBLAS may pick another
    # algorithm, and fp16 rounding can then move a near-tie token)
    if "cuda_graph_error" in figures:
        raise StepFailed("the decoding step cannot be captured as a CUDA graph", figures)
    if "compile_error" in figures:  # musefast promises fullgraph compilation of the step
        raise StepFailed("the decoding step does not compile with fullgraph=True", figures)
    return figures


def _cuda_graph_ms(step, inputs, eager, rehearse: bool):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    equal = all(torch.equal(a, b) for a, b in zip(static_out, eager))
    return 1e3 * _time(graph.replay, rehearse), equal


def amused_e2e(rehearse: bool, out: Path) -> dict:
    from amused_random import random_amused

    sizes = [("tiny", torch.float32)] if rehearse else [("amused-256", torch.float16), ("amused-512", torch.float16)]
    steps = 2 if rehearse else 12
    figures = {"steps": steps, "weights": "random", "cases": []}
    for size, dtype in sizes:
        pipe = random_amused(size, DEVICE, dtype)
        for batch in ([1] if rehearse else [1, 8]):
            prompts = ["a photo of a red cat on the house"] * batch
            with torch.no_grad():
                run = lambda: pipe(prompts, seed=0, num_inference_steps=steps, output_type="pt",  # noqa: E731
                                   progress=False)
                images = run()
                ms = 1e3 * _time(run, rehearse, warmup=1)
            figures["cases"].append({"size": size, "batch": batch, "dtype": str(dtype)[6:], "e2e_ms": ms,
                                     "ms_per_image": ms / batch, "image_shape": list(images.shape),
                                     "finite": bool(torch.isfinite(images.float()).all())})
            checkpoint(figures, _brief(figures["cases"][-1]))
        pipe = None  # free the model before building the next one
        if CUDA:
            torch.cuda.empty_cache()
    figures["diffusers_e2e"] = "not run here: benchmarks/test_bench_amused.py compares with diffusers when it is installed"
    return figures


def _peak_mib():
    """Peak GPU memory allocated since the last reset, in MiB (None on CPU); then reset."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def meissonic_1024(rehearse: bool, out: Path) -> dict:
    """One CFG decoding step of MeissonFlow/Meissonic at 1024² (64x64 tokens, both branches in
    one B=2 forward, then ``cfg_sample_remask`` on the (1, 4096, 8192) halves) and the VQ decode
    of 64x64 tokens to 1024² pixels, random weights; the rehearsal: a 1 + 1 block, 32-wide model,
    8x8 tokens."""
    from amused_random import random_vqgan

    from musefast import ops
    from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer

    if rehearse:
        config, grid, dtype = MeissonicConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                              axes_dims_rope=(4, 6, 6), vocab_size=72, codebook_size=64), 8, \
            torch.float32
    else:
        config, grid, dtype = MeissonicConfig(), 64, torch.bfloat16  # the defaults are MeissonFlow/Meissonic's
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = MeissonicTransformer(config).to(dtype).eval()
    n, k = grid * grid, config.codebook_size
    figures = {"config": "tiny" if rehearse else "MeissonFlow/Meissonic", "weights": "random", "dtype": str(dtype)[6:],
               "tokens": [grid, grid], "parameters": sum(p.numel() for p in model.parameters()),
               "weights_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
               "build_peak_mib": _peak_mib()}  # includes the fp32 initialisation before the cast
    gen = torch.Generator(DEVICE).manual_seed(1)
    hidden = torch.randn(2, 77, config.joint_attention_dim, device=DEVICE, generator=gen, dtype=dtype)
    pooled = torch.randn(2, config.pooled_projection_dim, device=DEVICE, generator=gen, dtype=dtype)
    micro = torch.tensor([16.0 * grid, 16.0 * grid, 0.0, 0.0, 6.0], device=DEVICE, dtype=dtype)
    tokens = torch.full((1, grid, grid), config.mask_token_id, dtype=torch.long, device=DEVICE)
    masked = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    num_to_mask = torch.full((1,), n * 253 // 256, dtype=torch.long, device=DEVICE)
    timestep = torch.tensor([47], device=DEVICE)
    with torch.no_grad():
        context = model.prepare_context(hidden, pooled, micro)

        def forward():
            logits = model(torch.cat([tokens, tokens]), context=context, timestep=timestep)
            return logits.permute(0, 2, 3, 1).reshape(2, n, k)  # a view: channels-last memory

        def step():
            uncond, cond = forward().chunk(2)
            return ops.cfg_sample_remask(cond, uncond, tokens=tokens.reshape(1, n), masked=masked,
                                         num_to_mask=num_to_mask, guidance_scale=9.0, choice_temperature=2.0,
                                         seed=0, step=0)

        figures["forward_finite"] = bool(torch.isfinite(forward()).all())
        _peak_mib()
        figures["forward_b2_ms"] = 1e3 * _time(forward, rehearse)
        figures["step_ms"] = 1e3 * _time(step, rehearse)
        figures["step_peak_mib"] = _peak_mib()
        figures["remask_ms"] = max(figures["step_ms"] - figures["forward_b2_ms"], 0.0)  # the sampling's share
        checkpoint(figures, _brief(figures))
        model = context = None  # free the transformer before the VQ decoder runs
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.device(DEVICE):  # MeissonFlow/Meissonic's vqvae is aMUSEd's; the pipeline runs it in fp32
            vq = random_vqgan(full=not rehearse).eval()
        codes = torch.randint(0, k, (1, grid, grid), device=DEVICE, generator=gen)
        pixels = vq.decode(codes)
        figures["vq_decode_ms"] = 1e3 * _time(lambda: vq.decode(codes), rehearse)
        figures.update(vq_decode_peak_mib=_peak_mib(), vq_dtype="float32", image_shape=list(pixels.shape),
                       image_finite=bool(torch.isfinite(pixels).all()))
    if CUDA:
        figures["memory_note"] = "peak MiB: torch.cuda.max_memory_allocated, reset before each part"
    return figures


STEPS = {f.__name__: f for f in (wheels, install, env, build, decode_step, amused_e2e, meissonic_1024, selftest,
                                 bench_remask, bench_attention, bench_vq, pytest_gpu)}


HEARTBEAT_S = 30


def _heartbeat(step: str) -> None:
    """A line every HEARTBEAT_S: a step that compiles (the extension, inductor, Triton) for a
    minute still shows it is alive, and for how long."""
    start = time.monotonic()
    while True:
        time.sleep(HEARTBEAT_S)
        print(f"({step}: still running after {time.monotonic() - start:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--wheelhouse", type=Path, default=None)
    args = parser.parse_args()
    global _PARTIAL, _WHEELHOUSE
    _PARTIAL, _WHEELHOUSE = args.result, args.wheelhouse
    result = {"status": "pass", "figures": {}, "error": None}
    threading.Thread(target=_heartbeat, args=(args.step,), daemon=True).start()
    try:
        result["figures"] = STEPS[args.step](args.rehearse, args.out)
    except Skip as exc:
        result.update(status="skipped", error=str(exc))
    except StepFailed as exc:
        result.update(status="fail", error=str(exc), figures=exc.figures)
    except Exception as exc:
        traceback.print_exc()
        result.update(status="fail", error=f"{type(exc).__name__}: {str(exc)[:500]}", figures=_LAST)
    args.result.write_text(json.dumps(result, default=str))
    print(json.dumps(result, default=str)[:4000])
    return 0 if result["status"] != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
