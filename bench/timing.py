"""Timing and the environment record shared by the benchmark scripts.

Timing goes through torch.utils.benchmark.Timer: it warms up, synchronizes CUDA
around each block and pins the thread count. Its default is ONE thread, so we
always pass torch.get_num_threads() (or an explicit count) and record it.
Several callables are timed in interleaved rounds (A B C A B C ...), so that
clock or load drift hits all of them alike and their ratios stay fair.
"""
import contextlib
import datetime
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys

import torch
from torch.utils import benchmark

from hsvkernels import _host_malloc


@contextlib.contextmanager
def env_set(env):
    """The environment variables in `env` set for the block (the op reads its HSV_* settings on every call;
    a value None unsets the variable), each as it was afterwards."""
    saved = {k: os.environ.get(k) for k in env}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    apply(env)
    try:
        yield
    finally:
        apply(saved)


def summarize(block_times, runs):
    """Median and quartiles (seconds per call) of per-block mean times."""
    ts = sorted(block_times)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    return {"median": statistics.median(ts), "p25": q1, "p75": q3, "iqr": q3 - q1, "min": ts[0],
            "max": ts[-1], "blocks": len(ts), "runs": runs}


def timer_for(fn, num_threads=None, label="", description=""):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, description=description,
                           num_threads=torch.get_num_threads() if num_threads is None else num_threads)


def time_interleaved(fns, *, min_run_time=0.2, rounds=3, warmup=2, min_blocks=5, num_threads=None):
    """Times each callable in `fns` (name -> fn); returns name -> summarize(...) dict.

    Each callable is called `warmup` times first (lazy init, cudnn.benchmark's
    algorithm search, caches), so that Timer's block-size estimate does not see
    them. Then, per round, blocked_autorange(min_run_time / rounds) runs for each
    callable in turn; the blocks of all rounds are pooled for the median. A slow
    callable may fill its time with one block per round, so callables with fewer
    than `min_blocks` blocks get more, still in turn: a median of two is no median.
    """
    timers = {name: timer_for(fn, num_threads, description=name) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    blocks = {name: [] for name in fns}
    runs = {name: 0 for name in fns}
    number = {}
    for _ in range(max(1, rounds)):
        for name, t in timers.items():
            m = t.blocked_autorange(min_run_time=min_run_time / max(1, rounds))
            blocks[name].extend(m.times)
            runs[name] += len(m.times) * m.number_per_run
            number[name] = m.number_per_run
    while any(len(b) < min_blocks for b in blocks.values()):
        for name, t in timers.items():
            if len(blocks[name]) < min_blocks:
                blocks[name].extend(t.timeit(number[name]).times)
                runs[name] += number[name]
    return {name: summarize(blocks[name], runs[name]) for name in fns}


def time_one(fn, *, min_run_time=0.2, min_blocks=5, num_threads=None):
    """One callable, one blocked_autorange, same summary as time_interleaved."""
    return time_interleaved({"fn": fn}, min_run_time=min_run_time, rounds=1, min_blocks=min_blocks,
                            num_threads=num_threads)["fn"]


# Environment --------------------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    """The SIMD ISA flags that decide which CPU kernels can run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                                          "avx512_vnni", "amx_tile", "amx_bf16"})
    except OSError:
        pass
    return []


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _getattr_path(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def precision_flags():
    """The flags that decide whether fp32 convs/matmuls may use TF32 (both APIs, where present)."""
    flags = {
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    # torch >= 2.9 also has per-backend fp32_precision settings; record them when they exist
    for path in ("cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision", "mkldnn.conv.fp32_precision",
                 "mkldnn.matmul.fp32_precision"):
        value = _getattr_path(torch.backends, path)
        if value is not None:
            flags[path] = value
    return flags


def environment(device="cpu"):
    """What a results file must say about the machine and the run."""
    import hsvkernels

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "hsvkernels": getattr(hsvkernels, "__version__", None),
        "hsvkernels_path": os.path.dirname(os.path.abspath(hsvkernels.__file__)),
        "hsvkernels_build": hsvkernels.build_info(),
        "methods": sorted(hsvkernels.METHODS),
        "formats": sorted(hsvkernels.FORMATS),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY",
                                                  "OMP_PROC_BIND", "OMP_PLACES", "DNNL_VERBOSE")
                       if k in os.environ},
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cudnn_available": torch.backends.cudnn.is_available(),
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "precision": precision_flags(),
        "host_malloc": _host_malloc.describe(),
        "device": device,
        "gpu": None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"name": props.name, "capability": "%d.%d" % (props.major, props.minor),
                      "memory_gib": round(props.total_memory / 2 ** 30, 1),
                      "sm_count": props.multi_processor_count}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader", "-i", str(dev.index or 0)],
                                 capture_output=True, text=True, timeout=10)
            if smi.returncode == 0:
                env["gpu"]["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def describe_environment(env):
    """A few lines for the top of a benchmark's output."""
    build = env["hsvkernels_build"]
    lines = [
        "command: %s" % env["command"],
        "host: %s  date: %s  git: %s" % (env["hostname"], env["date_utc"], env["git_commit"]),
        "torch %s  hsvkernels %s from %s" % (env["torch"], env["hsvkernels"], env["hsvkernels_path"]),
        "build: extension=%s cpu_kernels=%s cuda_kernels=%s kinds=%s" % (
            build.get("extension"), build.get("cpu_kernels"), build.get("cuda_kernels"), build.get("kinds")),
        "cpu: %s (%s)  capability %s  flags %s" % (env["cpu_model"], env["cpu_count"], env["cpu_capability"],
                                                    ",".join(env["cpu_flags"]) or "-"),
        "threads: %d (interop %d)  %s" % (env["threads"], env["interop_threads"],
                                          " ".join("%s=%s" % kv for kv in env["thread_env"].items())),
        "mkldnn: available=%s enabled=%s   cudnn: available=%s version=%s enabled=%s benchmark=%s" % (
            env["mkldnn_available"], env["mkldnn_enabled"], env["cudnn_available"], env["cudnn_version"],
            env["cudnn_enabled"], env["cudnn_benchmark"]),
        "precision: %s" % "  ".join("%s=%s" % kv for kv in env["precision"].items()),
        "host malloc: %s" % env.get("host_malloc", "-"),
    ]
    if env["gpu"]:
        lines.append("gpu: %s" % env["gpu"])
    if not build.get("extension"):
        lines.append("WARNING: hsvkernels._C is not loaded; the op runs the Python reference fallback")
    return lines
