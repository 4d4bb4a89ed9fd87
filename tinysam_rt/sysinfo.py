"""What machine a benchmark ran on: CPU model, cores, SIMD/matrix ISA, library versions, memory.

Everything is read from /proc and the standard library, so it works on a Raspberry Pi as well as
an x86 server; fields that cannot be detected are None, never guessed.
"""

import os
import platform
import resource
import sys

# /proc/cpuinfo flag -> our name. x86 lists "flags", ARM lists "Features".
_ISA_FLAGS = {
    "sse4_2": "SSE4.2",
    "avx": "AVX",
    "fma": "FMA",
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512-BF16",
    "amx_tile": "AMX-TILE",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "neon": "NEON",  # 32-bit ARM kernels
    "asimd": "NEON",  # aarch64 calls NEON "asimd"
    "asimddp": "DOTPROD",
    "i8mm": "I8MM",
    "asimdhp": "FP16-SIMD",
    "bf16": "BF16",
    "sve": "SVE",
    "sve2": "SVE2",
}
# ARM "CPU part" ids of cores found on common boards (Raspberry Pi 3/4/5, Jetson, phones).
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd49": "Neoverse-N2",
}


def parse_cpuinfo(text):
    """CPU facts from the text of /proc/cpuinfo.

    Returns:
        dict: "model" str or None (x86: the CPU name; ARM boards: "board (core)"), "isa" sorted list of our ISA names (see `_ISA_FLAGS`),
        "physical_cores" int or None (distinct (physical id, core id) pairs; None when the
        kernel does not list them, as on ARM), "processors" int (processor entries).
    """
    fields = {}
    flags, cores, processors = set(), set(), 0
    physical = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        fields.setdefault(key, value)
        if key == "processor":
            processors += 1
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    # x86 names the CPU in "model name"; a Pi names the board in "Model" and the core by part id.
    core = _ARM_PARTS.get(fields.get("CPU part", "").lower()) or fields.get("model name") or fields.get("Hardware")
    board = fields.get("Model")
    model = f"{board} ({core})" if board and core else board or core
    return {
        "model": model,
        "isa": sorted({name for flag, name in _ISA_FLAGS.items() if flag in flags}),
        "physical_cores": len(cores) or None,
        "processors": processors,
    }


# The headline capabilities a reader compares boards by; absent ones are reported as False.
HEADLINE_ISA = {
    "AVX2": ("AVX2",),
    "AVX-512": ("AVX-512F",),
    "VNNI": ("AVX-512-VNNI", "AVX-VNNI"),
    "AMX": ("AMX-INT8", "AMX-BF16", "AMX-TILE"),
    "NEON": ("NEON",),
    "DOTPROD": ("DOTPROD",),
}


def isa_summary(isa):
    """{headline name: bool} for `HEADLINE_ISA`, given a list of our ISA names."""
    present = set(isa)
    return {name: any(flag in present for flag in flags) for name, flags in HEADLINE_ISA.items()}


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def usable_cores():
    """CPUs this process may run on (affinity / cgroup cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


THREADS_PER_CPU = 4  # oversubscription still worth measuring; far beyond it is a typo


def max_threads():
    """The most intra-op threads tinysam-rt accepts: THREADS_PER_CPU per logical CPU.

    ORT starts every intra-op thread when a session is made, so a typo like 100000 would hang
    the process (thread creation, then memory) instead of failing.
    """
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def peak_rss_bytes():
    """Peak resident set size of this process image so far, in bytes.

    Linux: VmHWM of /proc/self/status. Not getrusage's ru_maxrss, which survives execve: a fresh
    `subprocess` child would report its parent's size at fork time (measured: 504 MiB inherited
    by a 13 MiB child). Elsewhere: ru_maxrss.
    """
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def current_rss_bytes():
    """Current resident set size in bytes from /proc/self/statm, or None off Linux."""
    text = _read("/proc/self/statm")
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE") if text else None


def runqueue_wait_s():
    """Seconds this process's threads have spent runnable but waiting for a CPU, or None.

    Sums field 2 of /proc/self/task/*/schedstat. A rise during a timed run means other processes
    took the cores: the measurement is contaminated.
    """
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        text = _read(f"/proc/self/task/{task}/schedstat")
        if text:
            total += int(text.split()[1])
    return total / 1e9


def load_average():
    """(1, 5, 15)-minute load averages, or None where unsupported."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def library_versions():
    """Versions of Python and the runtime's libraries (imports onnxruntime and cv2)."""
    import cv2
    import numpy
    import onnxruntime

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "opencv": cv2.__version__,
    }


def system_info():
    """Everything above as one JSON-ready dict."""
    cpu = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    return {
        "cpu_model": cpu["model"] or platform.processor() or None,
        "machine": platform.machine(),
        "os": platform.platform(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "physical_cores": cpu["physical_cores"],
        "isa": cpu["isa"],
        "isa_summary": isa_summary(cpu["isa"]),
        "load_average": load_average(),
        "blas_thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS") if k in os.environ},
        **library_versions(),
    }
