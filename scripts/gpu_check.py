"""Everything a time-limited GPU machine must check, in one command, offline; or its CPU rehearsal.

    python scripts/gpu_check.py --out DIR                    # on the GPU machine (one command, < 8 min)
    python scripts/gpu_check.py --wheelhouse .wheelhouse --out DIR   # same, diffusers carried as wheels
    python scripts/gpu_check.py --rehearse --out DIR         # anywhere: the same steps on CPU, tiny
    python scripts/gpu_check.py --rehearse --cold --out DIR  # ... from empty extension/Triton caches
    python scripts/gpu_check.py --plan                       # each step's cap, reserve, least timeout

On a remote GPU machine that is sent this checkout and runs one command, with git-ignored
folders carried along: prepare the wheels here once with ``bash scripts/make_wheelhouse.sh``
(writes .wheelhouse/, git-ignored), then

    run(command="python3 scripts/gpu_check.py --wheelhouse .wheelhouse --out $OUT",
        carry=[".wheelhouse"], timeout_s=500)

$OUT then brings back gpu_report.json, gpu_check.log and pytest_gpu.xml; the report belongs in
benchmarks/results/. A rerun of what a first call missed: ``--only STEP,... --budget S``.

Order: what produces the headline figures comes first (one aMUSEd-256 decoding step eager /
CUDA graph / torch.compile, aMUSEd-256 and -512 end to end, one Meissonic 1024² step), right
after the install and the extension build they depend on; then the self-test, the kernel
benchmarks and last the long ``pytest -m gpu``. Each step (scripts/gpu_check_steps.py) runs in
its own process group with its own timeout: at most its cap, and never so long that a later
step loses the share of the budget reserved for it. A step past its timeout has its whole
process group killed (compilers, pytest, inductor workers) and any extension build lock it
left removed, so the next step cannot hang on it; a failure or a timeout costs that step only.
If the build fails, later steps run with MUSEFAST_NO_EXT=1 rather than start it again.

Every step pins one Triton config per kernel (MUSEFAST_TRITON_FIXED_CONFIG=1: no autotuning,
which would spend the budget compiling and timing candidates; the report says so). Each line a
step prints goes to DIR/gpu_check.log and to stdout as it comes ("[step] line"); every 10 s and
after every step DIR/gpu_report.json is rewritten (environment, per step: status, wall and CPU
seconds, timeout, figures, error, the last lines of output), so a run cut short still leaves a
partial report. Exit code: 0 when no step failed (skipped steps are listed as such), 1 otherwise.
No step needs git (the commit id is read from .git; "unknown" without it) or the network.

Rehearsal (``--rehearse``): Triton runs under TRITON_INTERPRET=1, no GPU is touched, the models
and benchmarks run at tiny sizes, ``pytest -m gpu`` collects the GPU tests and reports them
skipped, CUDA graphs are skipped and torch.compile traces with its "eager" backend. The report
(and the summary) lists per step what only a GPU run proves (``unproven_without_gpu``). Each
step's cap and reserve on the rehearsal are its GPU ones times its ``rehearsal_scale``: 1 for
steps whose host-side work is serial Python (one core here does what one core does there), 3
for the build, whose 5 C++ translation units compile in one wave on the GPU machine's 16 cores
and in ceil(5/2) = 3 waves on 2 cores. ``--cold`` gives the steps fresh extension, Triton and
inductor caches (as on a bare GPU machine). CPU seconds per step (user + system of the step's
processes) are reported beside wall seconds, with the load average, because a shared machine
stretches wall time by its load and leaves CPU time almost as it is.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS_SCRIPT = Path(__file__).resolve().parent / "gpu_check_steps.py"
REPORT_NAME, LOG_NAME = "gpu_report.json", "gpu_check.log"
# The whole run on an H100/H200: one device-tool command of at most 8 minutes, which leaves
# about 5 of the 15 device minutes (machine start included) for a rerun of what it missed.
BUDGET_S = 450
PARTIAL_REPORT_EVERY_S = 10.0
TAIL_LINES = 25  # lines of each step's output kept in the report


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # its timeout on a GPU machine
    reserve_s: float  # held back for it while the steps before it run
    unproven: str  # what only a GPU run shows about this step ("" when the rehearsal shows it all)
    rehearsal_scale: float = 1.0  # how much longer its host-side work takes on 2 cores (module doc)


STEPS = [
    Step("wheels", 60, 0, ""),  # skipped without --wheelhouse
    Step("install", 60, 15, ""),
    Step("env", 30, 15, "device name, memory, nvcc, the GPU image's package versions"),
    Step("build", 180, 60, "the CUDA part of musefast._C (nvcc for the visible GPU) and its load; "
                           "the rehearsal builds the CPU part only", rehearsal_scale=3.0),
    Step("decode_step", 150, 60, "aMUSEd-256 fp16 step at batch 8 on CUDA, CUDA-graph capture and replay, "
                                 "inductor code generation (the rehearsal traces with the eager backend)"),
    Step("amused_e2e", 90, 40, "aMUSEd-256/512 fp16 at real size on CUDA, batch 1 and 8, and their latency"),
    Step("meissonic_1024", 75, 40, "the 1B-parameter Meissonic transformer in bf16 at 64x64 tokens, "
                                   "the 1024² VQ decode and peak GPU memory"),
    Step("selftest", 60, 20, "compiled Triton and CUDA kernels against the reference (the rehearsal "
                             "checks the CPU kernels and Triton in its interpreter)"),
    Step("bench_remask", 40, 15, "CUDA/Triton decoding-step kernel timings at B=8 N=4096 K=8192"),
    Step("bench_attention", 45, 15, "Triton attention vs SDPA/flash-attn timings at real sizes"),
    Step("bench_vq", 40, 15, "CUDA/Triton VQ nearest-code timings at N=65536"),
    Step("pytest_gpu", 240, 60, "every test marked gpu (the rehearsal only collects them: all skipped)"),
]
STEP_NAMES = [s.name for s in STEPS]
MIN_STEP_S = 5  # a step with less time than this left is reported as not run


def _build_module():
    """musefast/_build.py loaded by path: this process needs its lock function before (and
    whether or not) musefast is installed, and without importing torch."""
    spec = importlib.util.spec_from_file_location("musefast_build_for_gpu_check", ROOT / "musefast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_base(env: dict) -> Path:
    """The extension cache a step builds into (musefast's default unless MUSEFAST_CACHE is set)."""
    return Path(env.get("MUSEFAST_CACHE") or Path.home() / ".cache" / "musefast")


def remove_build_locks(base: Path, since: float) -> list[str]:
    """Remove the torch extension build locks under ``base`` made since ``since`` (epoch s):
    left by a step whose processes are all dead, they would make the next build wait forever
    (torch <= 2.13 waits for the file to disappear)."""
    import warnings

    build = _build_module()
    removed = []
    for lock in sorted(base.glob("ext/*/lock")):
        try:
            if lock.stat().st_mtime < since - 1:
                continue  # older than the step: not its lock
        except FileNotFoundError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if build.clear_stale_build_lock(lock.parent, max_age_s=0, existence_lock=True):
                removed.append(str(lock))
    return removed


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_group(pgid: int, wait_s: float = 10.0) -> list[int]:
    """SIGKILL every process of the group and wait until none is left; the pids still alive
    after ``wait_s`` (none, unless a process is stuck in the kernel)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return []
        left = _group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def step_env(name: str, rehearse: bool, *, caches: Path | None = None, no_ext: bool = False) -> dict:
    """The environment of one step's processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One config per Triton kernel for every step: autotuning compiles and times each candidate,
    # which a GPU machine's 8-minute budget cannot pay for (kernels/_tuning.py).
    env["MUSEFAST_TRITON_FIXED_CONFIG"] = "1"
    if rehearse:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal never touches a GPU, even where there is one
    if caches is not None:  # --cold: what a bare machine starts with
        env.update(MUSEFAST_CACHE=str(caches / "musefast"), TRITON_CACHE_DIR=str(caches / "triton"),
                   TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"))
    if no_ext:  # the build failed: later steps measure without the C++/CUDA kernels instead of rebuilding
        env["MUSEFAST_NO_EXT"] = "1"
    return env


def step_command(name: str, result_file: Path, out_dir: Path, rehearse: bool, wheelhouse: Path | None) -> list[str]:
    cmd = [sys.executable, str(STEPS_SCRIPT), name, "--result", str(result_file), "--out", str(out_dir)]
    if rehearse:
        cmd.append("--rehearse")
    if wheelhouse is not None:
        cmd += ["--wheelhouse", str(wheelhouse)]
    return cmd


class _Output:
    """Reads a step's output as it comes: each line to the log, to stdout and to a tail."""

    def __init__(self, stream, name: str, log):
        self.tail: list[str] = []
        self._stream, self._name, self._log = stream, name, log
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stream:
            line = line.rstrip("\n")
            self._log.write(line + "\n")
            self._log.flush()
            print(f"[{self._name}] {line}", flush=True)
            self.tail = (self.tail + [line[:500]])[-TAIL_LINES:]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def run_step(step: Step, timeout: float, *, rehearse: bool, out_dir: Path, log, env: dict,
             wheelhouse: Path | None = None, on_progress=None) -> dict:
    """Run one step in its own process group; its report entry."""
    result_file = out_dir / f".{step.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = step_command(step.name, result_file, out_dir, rehearse, wheelhouse)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    log.write(f"\n===== {step.name} (timeout {timeout:.0f} s) {now}\n")
    log.flush()
    print(f"== {step.name} (timeout {timeout:.0f} s)", flush=True)
    started_epoch, start, cpu0 = time.time(), time.perf_counter(), _children_cpu_s()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # its own process group
    output = _Output(proc.stdout, step.name, log)
    code, next_partial = None, start + PARTIAL_REPORT_EVERY_S
    while True:
        try:
            code = proc.wait(timeout=max(0.05, min(next_partial, start + timeout) - time.perf_counter()))
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.perf_counter()
        if now >= start + timeout:
            break
        if on_progress is not None and now >= next_partial:
            on_progress({"status": "running", "wall_s": round(now - start, 2), "timeout_s": round(timeout, 1),
                         "output_tail": list(output.tail)})
            next_partial = now + PARTIAL_REPORT_EVERY_S
    # Kill what is left of the group either way: a timed-out step's children (pytest, doctor,
    # ninja, compilers, inductor's workers), or what a finished step left running.
    stray = kill_group(proc.pid)
    timed_out = code is None
    code = proc.wait()
    output.join(5)
    # A finished build removes its lock (torch <= 2.13) or leaves an unheld one that means
    # nothing (2.14+): only a killed step's locks need removing.
    locks = remove_build_locks(cache_base(env), started_epoch) if timed_out or code < 0 else []
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu0
    entry = {"status": "fail", "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "timeout_s": round(timeout, 1),
             "figures": {}, "error": None}
    if result_file.is_file():
        try:
            entry.update(json.loads(result_file.read_text()))
        except json.JSONDecodeError as exc:
            entry["error"] = f"unreadable step result: {exc}"
        result_file.unlink()
    if timed_out:  # figures the step saved before it was killed are kept
        entry.update(status="fail", error=f"timed out after {timeout:.0f} s; its process group was killed")
    elif code != 0 and entry["status"] == "pass":
        entry.update(status="fail", error=entry.get("error") or f"exit code {code}")
    elif code != 0 and not entry.get("error"):
        entry["error"] = f"exit code {code} (see {LOG_NAME})"
    if locks:
        entry["removed_build_locks"] = locks
    if stray:
        entry["processes_not_killed"] = stray
    entry["output_tail"] = output.tail
    line = f"===== {step.name}: {entry['status']} in {wall:.1f} s ({cpu:.1f} s CPU)"
    line += f"; {entry['error']}" if entry["error"] else ""
    line += f"; removed {', '.join(locks)}" if locks else ""
    log.write(line + "\n")
    log.flush()
    print(line, flush=True)
    return entry


def plan(only: list[str] | None) -> list[Step]:
    return [s for s in STEPS if not only or s.name in only]


def step_timeout(steps: list[Step], index: int, left: float, rehearse: bool) -> float:
    """At most the step's cap, and never eating into what is reserved for the steps after it."""
    scale = (lambda s: s.rehearsal_scale) if rehearse else (lambda s: 1.0)
    step = steps[index]
    reserved = sum(s.reserve_s * scale(s) for s in steps[index + 1:])
    return min(step.cap_s * scale(step), left - reserved)


def default_budget(rehearse: bool) -> float:
    """The GPU budget; on a rehearsal, with each step's cap share scaled as the steps are."""
    if not rehearse:
        return BUDGET_S
    return BUDGET_S + sum((s.rehearsal_scale - 1.0) * s.cap_s for s in STEPS)


def run(out_dir: Path, *, rehearse: bool, only: list[str] | None = None, budget_s: float | None = None,
        wheelhouse: Path | None = None, cold: bool = False, steps: list[Step] | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else plan(only)
    budget = budget_s or default_budget(rehearse)
    report = {
        "kind": "rehearsal" if rehearse else "gpu",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "cold_caches": cold,
        "triton_configs": "pinned: one per kernel (MUSEFAST_TRITON_FIXED_CONFIG=1), no autotuning",
        "load_average_start": load_average(),
        "host_cpus": os.cpu_count(),
        "environment": {},
        "steps": {},
        "complete": False,
    }
    if rehearse:
        report["unproven_without_gpu"] = {s.name: s.unproven for s in steps if s.unproven}
        report["rehearsal_scaling"] = {s.name: s.rehearsal_scale for s in steps if s.rehearsal_scale != 1.0}
    report_path = out_dir / REPORT_NAME

    def write_report():
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, report_path)

    t0 = time.perf_counter()
    deadline = t0 + budget
    caches = Path(tempfile.mkdtemp(prefix="musefast-gpu-check-caches-")) if cold else None
    no_ext = False
    with open(out_dir / LOG_NAME, "w") as log:
        for i, step in enumerate(steps):
            left = deadline - time.perf_counter()
            timeout = step_timeout(steps, i, left, rehearse)
            if step.name == "wheels" and wheelhouse is None:
                report["steps"][step.name] = {"status": "skipped", "wall_s": 0.0, "cpu_s": 0.0, "figures": {},
                                              "error": "no --wheelhouse given: diffusers comparisons run only "
                                                       "where diffusers is installed"}
            elif timeout < min(MIN_STEP_S, step.cap_s):
                report["steps"][step.name] = {"status": "fail", "wall_s": 0.0, "cpu_s": 0.0, "figures": {},
                                              "error": f"not run: the {budget:.0f} s budget was spent"}
            else:
                env = step_env(step.name, rehearse, caches=caches, no_ext=no_ext)

                def progress(entry, name=step.name):
                    report["steps"][name] = entry
                    write_report()

                entry = run_step(step, timeout, rehearse=rehearse, out_dir=out_dir, log=log, env=env,
                                 wheelhouse=wheelhouse, on_progress=progress)
                if no_ext:
                    entry["extension"] = "disabled (MUSEFAST_NO_EXT=1): the build step failed"
                report["steps"][step.name] = entry
                if step.name == "env":
                    report["environment"] = entry["figures"]
                if step.name == "build" and entry["status"] == "fail":
                    no_ext = True
            write_report()
    if caches is not None:
        import shutil

        shutil.rmtree(caches, ignore_errors=True)
    report["load_average_end"] = load_average()
    report["complete"] = True
    report["passed"] = all(s["status"] != "fail" for s in report["steps"].values())
    write_report()
    return report


def summary(report: dict, out_dir: Path) -> str:
    lines = [f"{'step':16s} {'status':7s} {'wall s':>7s} {'cpu s':>7s} {'limit s':>7s}  error"]
    for name, step in report["steps"].items():
        lines.append(f"{name:16s} {step['status']:7s} {step['wall_s']:7.1f} {step.get('cpu_s', 0.0):7.1f} "
                     f"{step.get('timeout_s', 0.0):7.0f}  {step['error'] or ''}")
    lines.append(f"total {report['wall_s']:.1f} s of a {report['budget_s']:.0f} s budget; load average "
                 f"{report['load_average_start']} -> {report.get('load_average_end')} on {report['host_cpus']} CPUs; "
                 f"report: {out_dir / REPORT_NAME}")
    unproven = report.get("unproven_without_gpu")
    if unproven:
        lines.append("GPU-only, still unproven by this rehearsal:")
        lines += [f"  {name}: {what}" for name, what in unproven.items()]
    return "\n".join(lines)


def plan_table(steps: list[Step], budget: float, rehearse: bool) -> str:
    """Each step's cap and reserve, and the timeout it gets when every step before it runs to
    its own timeout (the worst case: the least it can get)."""
    lines = [f"{'step':16s} {'cap s':>6s} {'reserve s':>9s} {'worst-case timeout s':>20s}  (budget {budget:.0f} s)"]
    left = budget
    for i, step in enumerate(steps):
        timeout = max(step_timeout(steps, i, left, rehearse), 0.0)
        scale = step.rehearsal_scale if rehearse else 1.0
        lines.append(f"{step.name:16s} {step.cap_s * scale:6.0f} {step.reserve_s * scale:9.0f} {timeout:20.0f}")
        left -= timeout
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_report.json and gpu_check.log (required)")
    parser.add_argument("--plan", action="store_true", help="print each step's timeouts and exit")
    parser.add_argument("--rehearse", action="store_true", help="run every step on CPU at tiny sizes")
    parser.add_argument("--cold", action="store_true",
                        help="fresh extension, Triton and inductor caches for the steps (a bare machine)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(STEP_NAMES)}")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds (default {BUDGET_S}; rehearsal {default_budget(True):.0f})")
    parser.add_argument("--wheelhouse", type=Path, default=None,
                        help="folder of carried wheels (scripts/make_wheelhouse.sh) installed offline first")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",")]
        unknown = [s for s in only if s not in STEP_NAMES]
        if unknown:
            parser.error(f"unknown step(s) {unknown}; steps: {STEP_NAMES}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.plan:
        print(plan_table(plan(only), args.budget or default_budget(args.rehearse), args.rehearse))
        return 0
    if args.out is None:
        parser.error("--out DIR is required (the folder for gpu_report.json and gpu_check.log)")
    if args.wheelhouse is not None:
        args.wheelhouse = args.wheelhouse.resolve()
        if not args.wheelhouse.is_dir() or not any(args.wheelhouse.glob("*.whl")):
            parser.error(f"--wheelhouse {args.wheelhouse}: no folder of .whl files there "
                         "(prepare it with: bash scripts/make_wheelhouse.sh)")
    report = run(args.out, rehearse=args.rehearse, only=only, budget_s=args.budget, wheelhouse=args.wheelhouse,
                 cold=args.cold)
    print(summary(report, args.out), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
