"""Inversion cost at two step counts: wall time against plain DDIM, peak host memory, disk.

DESIGN 5 asks for every time as a ratio to the floor measured in the same run on the same
model, and for host memory that does not grow with the number of steps N (the cache is
written step by step). This benchmark checks both by inverting the same frames at several
step counts, each in a fresh child process:

- `invert_s`: `fatezero_cli.inversion.invert` into a fresh, empty cache directory (never a hit);
- `plain_ddim_s`: the same DDIM inversion loop (same UNet, same spatial-temporal processors from
  `plain_processors`, same `ddim_inverse_scheduler`, same text and VAE encoding) with no capture
  and no cache writes; its final latent must equal the cache's, which proves it is the same work;
- `peak_rss_mb`: `ru_maxrss` of the child at its end. `ru_maxrss` is a process-lifetime
  high-water mark, so only a fresh process per step count can compare them; `base_rss_mb` is
  the same figure after loading and a one-step warm-up, and `step_drift_mb` is how much the
  resident set changed from the first inversion step to the last (it would be about
  N x MB/step if anything accumulated);
- `cache_mb`: the bytes the manifest lists (`result.summary()["bytes"]`).

It also replays the cache's writes on the files the inversion produced (copy, safetensors
serialisation, sha256, write + fsync) to show where the time above plain DDIM goes.

Usage, from the repository root: `.venv/bin/python benchmarks/invert_memory.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO_ROOT.parent / "shared" / "data" / "clips" / "black-swan.mp4"
DEFAULT_PROMPT = "a black swan swimming in a river"
RESULT_MARKER = "BENCH_RESULT "
RSS_TOLERANCE = 0.10
MIB = 1024 * 1024
# glibc raises its mmap threshold each time a large block is freed, so which buffers land in
# the heap (and stay resident) depends on allocation order: identical processes peak 530 to
# 620 MB. A fixed threshold makes the peak reproducible to ~1 MB (and page faults cost time).
STEADY_MMAP_THRESHOLD = 128 * 1024


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Invert one clip at several step counts; report time vs plain DDIM, "
        "peak RSS and cache size per step count.",
    )
    parser.add_argument("--model", help="any model load_model accepts (default: tiny random)")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--capture", type=float, default=0.8)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: as load_model picks)")
    parser.add_argument("--dtype", help="fp32, fp16, bf16 (default: as load_model picks)")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the min over these")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the children")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help=f"children run with MALLOC_MMAP_THRESHOLD_={STEADY_MMAP_THRESHOLD} (glibc): "
        "reproducible peak RSS, slower timings",
    )
    parser.add_argument("--tmp-dir", type=Path, help="where the caches go (fsync cost varies)")
    parser.add_argument("--json", type=Path, help="also write every child's raw result here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the RSS check fails")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.steps) < 1:
        parser.error("--repeats and --steps must be 1 or more")
    return args


# --- child: one step count, one process -----------------------------------------------------


def peak_rss_mb() -> float:
    """This process's lifetime peak resident set; Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident set now (Linux only). Sampled after every inversion step, it shows growth with
    N far more sharply than the peak, which the model load and imports dominate."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def drift_mb(trace: list[float | None]) -> float | None:
    """Resident set after the last step minus after the first: ~0 when nothing accumulates."""
    if len(trace) < 2 or trace[0] is None or trace[-1] is None:
        return None
    return trace[-1] - trace[0]


def synchronize(device) -> None:
    """Wall times on CUDA must wait for the queued kernels."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    value = function()
    synchronize(device)
    return time.perf_counter() - start, value


def plain_ddim(bundle, clip, settings):
    """The floor an inversion is compared with: the same loop as `run_inversion`, minus the
    capture wrappers and every cache write. Returns the final latent."""
    import torch

    from fatezero_cli.attention import AttentionBackend, KeyFrames, VideoFrames, plain_processors
    from fatezero_cli.inversion import encode_frames
    from fatezero_cli.prompts import encode_prompts
    from fatezero_cli.video import frames_to_tensor

    with torch.no_grad():
        text = encode_prompts(
            bundle.tokenizer,
            bundle.text_encoder,
            [settings.source_prompt],
            bundle.device,
            bundle.dtype,
        )
        latent = encode_frames(bundle, frames_to_tensor(clip.frames))
        scheduler = bundle.ddim_inverse_scheduler()
        scheduler.set_timesteps(settings.steps, device=bundle.device)
        num_frames = len(clip.frames)
        frames = VideoFrames(
            num_frames,
            KeyFrames.parse(settings.key_frames),
            AttentionBackend(),
            settings.key_frame_min_channels,
        )
        bundle.unet.set_attn_processor(plain_processors(bundle.unet, frames))
        conditioning = text.expand(num_frames, -1, -1)
        for timestep in [int(t) for t in scheduler.timesteps]:
            noise = bundle.unet(latent, timestep, encoder_hidden_states=conditioning).sample
            latent = scheduler.step(noise, timestep, latent).prev_sample
        return latent


def invert_fresh(
    bundle, clip, settings, tmp_dir: Path | None, keep: list[Path], trace: list[float | None]
):
    """One inversion into a new, empty cache root, so it really computes (no cache hit);
    `trace` gets the resident set after each step."""
    from fatezero_cli.inversion import invert

    root = Path(tempfile.mkdtemp(prefix="fatezero-bench-cache-", dir=tmp_dir))
    keep.append(root)
    result = invert(bundle, clip, settings, root, on_step=lambda *_: trace.append(current_rss_mb()))
    if result.hit:
        raise RuntimeError(f"cache hit in a fresh directory {root}: the benchmark is broken")
    return result


def replay_writes(cache, scratch: Path) -> dict[str, float]:
    """Seconds each part of `CacheWriter.write` (plus the capture copy) takes on this cache's
    files, redone on the same tensors: what an inversion spends beyond plain DDIM."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from fatezero_cli.cache import _atomic_write  # the exact write path invert uses

    totals = {"copy_s": 0.0, "serialise_s": 0.0, "sha256_s": 0.0, "write_fsync_s": 0.0}
    for name in cache.manifest["files"]:
        tensors = load_safetensors((cache.path / name).read_bytes())
        start = time.perf_counter()
        copies = {key: value.detach().to("cpu", copy=True) for key, value in tensors.items()}
        copied = time.perf_counter()
        data = save_safetensors(copies)
        serialised = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hashed = time.perf_counter()
        _atomic_write(scratch / name, data)
        written = time.perf_counter()
        totals["copy_s"] += copied - start
        totals["serialise_s"] += serialised - copied
        totals["sha256_s"] += hashed - serialised
        totals["write_fsync_s"] += written - hashed
    return totals


def time_cache_key(bundle, clip, settings) -> float:
    """The content address hashes the frames before anything runs; part of invert's cost."""
    from fatezero_cli.inversion import cache_inputs

    start = time.perf_counter()
    cache_inputs(bundle, clip, settings)
    return time.perf_counter() - start


def load_inputs(args: argparse.Namespace):
    import torch

    from fatezero_cli.cli.common import silence_libraries
    from fatezero_cli.config import InversionSettings
    from fatezero_cli.models import load_model
    from fatezero_cli.video import FrameSelection, read_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    silence_libraries()
    clip = read_clip(args.video, FrameSelection(count=args.frames), size=args.size)
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    settings = InversionSettings(args.prompt, steps=args.steps[0], capture=args.capture)
    return bundle, clip, settings


def alternate(repeats: int, invert_once: Callable[[], float], plain_once: Callable[[], float]):
    """Invert and plain DDIM, alternately (ABBA...), so both see the same machine load: on a
    shared two-core box a neighbour's burst can triple one block of timings."""
    times: dict[str, list[float]] = {"invert": [], "plain": []}
    runs = {"invert": invert_once, "plain": plain_once}
    for repeat in range(repeats):
        order = ("invert", "plain") if repeat % 2 == 0 else ("plain", "invert")
        for kind in order:
            times[kind].append(runs[kind]())
    return times["invert"], times["plain"]


def run_child(args: argparse.Namespace) -> dict:
    """Everything for one step count, in this fresh process.

    The warm-up runs one plain step, so the loaded baseline already holds the plain loop's
    per-step peak (the loop keeps nothing across steps); the plain runs interleaved with the
    inversions therefore cannot raise `ru_maxrss`, and `rss_after_first_invert_mb` (read
    before any timed plain run) checks that.
    """
    import torch

    load_average = " ".join(f"{value:.2f}" for value in os.getloadavg())
    bundle, clip, settings = load_inputs(args)
    device = bundle.device
    plain_ddim(bundle, clip, dataclasses.replace(settings, steps=1))  # pays one-time costs
    base_rss = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    roots: list[Path] = []
    traces: list[list[float | None]] = []
    state: dict = {}

    def invert_once() -> float:
        for root in roots:  # the previous repeat's cache: disk only, never reused
            shutil.rmtree(root, ignore_errors=True)
        traces.append([])
        seconds, state["result"] = timed(
            lambda: invert_fresh(bundle, clip, settings, args.tmp_dir, roots, traces[-1]), device
        )
        state.setdefault("rss_after_first_invert_mb", peak_rss_mb())
        return seconds

    def plain_once() -> float:
        seconds, state["latent"] = timed(lambda: plain_ddim(bundle, clip, settings), device)
        return seconds

    try:
        invert_times, plain_times = alternate(args.repeats, invert_once, plain_once)
        rss = peak_rss_mb()
        peak_gpu = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
        cache = state["result"].cache
        cached = cache.step(cache.timesteps[-1])["latent"]
        difference = (state["latent"].float().cpu() - cached.float()).abs().max().item()
        scratch = Path(tempfile.mkdtemp(prefix="fatezero-bench-replay-", dir=args.tmp_dir))
        roots.append(scratch)
        replay = replay_writes(cache, scratch)
        replay["key_s"] = time_cache_key(bundle, clip, settings)
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "steps": settings.steps,
        "captured_steps": len(cache.captured_timesteps),
        "files": len(cache.manifest["files"]),
        "invert_s": min(invert_times),
        "invert_all_s": invert_times,
        "plain_ddim_s": min(plain_times),
        "plain_all_s": plain_times,
        "final_latent_max_diff": difference,
        "base_rss_mb": base_rss,
        "rss_after_first_invert_mb": state["rss_after_first_invert_mb"],
        "peak_rss_mb": rss,
        "step_rss_traces_mb": traces,
        "step_rss_drift_mb": [drift_mb(trace) for trace in traces],
        "peak_gpu_mb": peak_gpu,
        "cache_bytes": state["result"].summary()["bytes"],
        "replay": replay,
        "device": str(device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "frames_shape": list(clip.frames.shape),
        "load_average": load_average,
    }


# --- parent: one child per step count, then the table ---------------------------------------


def child_command(args: argparse.Namespace, model: str, steps: int) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model]
    command += ["--video", str(args.video), "--size", str(args.size)]
    command += ["--frames", str(args.frames), "--steps", str(steps)]
    command += ["--capture", str(args.capture), "--prompt", args.prompt]
    command += ["--repeats", str(args.repeats)]
    for option in ("device", "dtype", "threads", "tmp_dir"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    return command


def child_environment(args: argparse.Namespace) -> dict[str, str]:
    """The children inherit the parent's OMP_NUM_THREADS (unset: torch's default), unless
    --threads overrides it; thread count changes CPU timings more than anything else."""
    environment = dict(os.environ)
    if args.threads:
        environment["OMP_NUM_THREADS"] = str(args.threads)
    if args.steady_malloc:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(STEADY_MMAP_THRESHOLD)
    return environment


def measure(args: argparse.Namespace, model: str, steps: int) -> dict:
    """Run one child; its last marked stdout line is the result."""
    print(f"  measuring {steps} steps ...", file=sys.stderr, flush=True)
    completed = subprocess.run(
        child_command(args, model, steps),
        env=child_environment(args),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"child for {steps} steps failed (exit {completed.returncode})")
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


def print_header(args: argparse.Namespace, model_label: str, first: dict) -> None:
    import platform

    import torch

    frames, height, width = first["frames_shape"][:3]
    print(f"model:   {model_label}")
    print(f"video:   {args.video} ({frames} frames at {width}x{height}), prompt {args.prompt!r}")
    print(f"device:  {first['device']}  dtype: {first['dtype']}  capture: {args.capture}")
    print(
        f"threads: child torch {first['threads']}, parent torch {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={child_environment(args).get('OMP_NUM_THREADS', '(unset)')}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    print(f"torch:   {torch.__version__}; timings: min of {args.repeats} repeats, alternated")
    print(f"load:    {first['load_average']} (1/5/15 min, when the child started)")
    threshold = child_environment(args).get("MALLOC_MMAP_THRESHOLD_", "(unset: glibc dynamic)")
    print(f"malloc:  MALLOC_MMAP_THRESHOLD_={threshold}")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def format_drift(drifts: list[float | None]) -> str:
    """The largest step-1-to-step-N change of the resident set over the repeats."""
    known = [drift for drift in drifts if drift is not None]
    return f"{max(known, key=abs):+.1f}" if known else "n/a"


def main_table(results: list[dict]) -> str:
    headers = ["steps", "captured", "invert_s", "plain_ddim_s", "ratio", "base_rss_mb"]
    headers += ["peak_rss_mb", "step_drift_mb", "cache_mb", "mb_per_step"]
    if any(r["peak_gpu_mb"] is not None for r in results):
        headers.append("peak_gpu_mb")
    rows = []
    for r in results:
        cache_mb = r["cache_bytes"] / MIB
        row = [
            str(r["steps"]),
            str(r["captured_steps"]),
            f"{r['invert_s']:.3f}",
            f"{r['plain_ddim_s']:.3f}",
            f"{r['invert_s'] / r['plain_ddim_s']:.2f}",
            f"{r['base_rss_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            format_drift(r["step_rss_drift_mb"]),
            f"{cache_mb:.1f}",
            f"{cache_mb / r['steps']:.2f}",
        ]
        if "peak_gpu_mb" in headers:
            row.append(f"{r['peak_gpu_mb']:.0f}")
        rows.append(row)
    return format_table(headers, rows)


def overhead_table(results: list[dict]) -> str:
    """invert_s - plain_ddim_s next to the replayed parts of the cache writes."""
    parts = ["key_s", "copy_s", "serialise_s", "sha256_s", "write_fsync_s"]
    headers = ["steps", "files", "overhead_s", *parts, "unexplained_s"]
    rows = []
    for r in results:
        overhead = r["invert_s"] - r["plain_ddim_s"]
        explained = sum(r["replay"][part] for part in parts)
        rows.append(
            [str(r["steps"]), str(r["files"]), f"{overhead:.3f}"]
            + [f"{r['replay'][part]:.3f}" for part in parts]
            + [f"{overhead - explained:.3f}"]
        )
    return format_table(headers, rows)


def rss_verdict(results: list[dict]) -> tuple[bool, str]:
    """Peak RSS at the most steps over the fewest; within 10% means memory does not grow
    with N."""
    low = min(results, key=lambda r: r["steps"])
    high = max(results, key=lambda r: r["steps"])
    ratio = high["peak_rss_mb"] / low["peak_rss_mb"]
    passed = abs(ratio - 1) <= RSS_TOLERANCE
    growth = [f"{r['steps']}: {r['peak_rss_mb'] - r['base_rss_mb']:+.0f} MB" for r in results]
    return passed, (
        f"peak RSS {high['steps']} steps / {low['steps']} steps = {ratio:.3f} "
        f"(limit 1 +/- {RSS_TOLERANCE:.2f}): {'PASS' if passed else 'FAIL'}; "
        f"growth over the loaded baseline: {', '.join(growth)}"
    )


def report(args: argparse.Namespace, model_label: str, results: list[dict]) -> bool:
    print_header(args, model_label, results[0])
    print()
    print(main_table(results))
    print()
    print("where invert's time beyond plain DDIM goes (cache writes replayed on its files):")
    print(overhead_table(results))
    print()
    worst = max(r["final_latent_max_diff"] for r in results)
    print(f"plain DDIM final latent vs the cache's: max |diff| = {worst:.2e} (same work)")
    passed, verdict = rss_verdict(results)
    print(verdict)
    return passed


def run_parent(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fatezero-bench-model-") as folder:
        model = args.model
        label = model
        if model is None:
            from fatezero_cli.testing import save_tiny_model

            print("  saving the tiny random-weight model ...", file=sys.stderr, flush=True)
            model = str(save_tiny_model(Path(folder) / "tiny-sd"))
            label = "tiny random-weight SD 1.x (fatezero_cli.testing.save_tiny_model)"
        results = [measure(args, model, steps) for steps in sorted(set(args.steps))]
    passed = report(args, label, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if args.strict and not passed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(run_child(args)), flush=True)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
