"""Machine description: /proc/cpuinfo parsing for x86 servers and Raspberry Pi boards."""

import subprocess
import sys

import numpy as np
import pytest

from tinysam_rt import sysinfo

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16
"""

PI4_AARCH64 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

PI5 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

PI_ARMV7 = """processor\t: 0
model name\t: ARMv7 Processor rev 3 (v7l)
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU part\t: 0xd08
Model\t\t: Raspberry Pi 4 Model B Rev 1.2
"""


def test_x86_server():
    cpu = sysinfo.parse_cpuinfo(X86)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["processors"] == 2
    assert cpu["physical_cores"] == 1  # two hyper-threads of one core
    assert {"AVX2", "AVX-512F", "AVX-512-VNNI", "AMX-INT8"} <= set(cpu["isa"])
    assert sysinfo.isa_summary(cpu["isa"]) == {
        "AVX2": True, "AVX-512": True, "VNNI": True, "AMX": True, "NEON": False, "DOTPROD": False}


def test_raspberry_pi_4_aarch64():
    cpu = sysinfo.parse_cpuinfo(PI4_AARCH64)
    assert cpu["model"] == "Raspberry Pi 4 Model B Rev 1.4 (Cortex-A72)"
    assert cpu["processors"] == 2
    assert cpu["physical_cores"] is None  # ARM kernels do not list core ids
    assert cpu["isa"] == ["NEON"]
    assert sysinfo.isa_summary(cpu["isa"])["DOTPROD"] is False


def test_raspberry_pi_5_has_dotprod():
    cpu = sysinfo.parse_cpuinfo(PI5)
    assert cpu["model"] == "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)"
    assert sysinfo.isa_summary(cpu["isa"]) == {
        "AVX2": False, "AVX-512": False, "VNNI": False, "AMX": False, "NEON": True, "DOTPROD": True}
    assert "FP16-SIMD" in cpu["isa"]


def test_32_bit_raspberry_pi_os_names_the_core_not_armv7():
    cpu = sysinfo.parse_cpuinfo(PI_ARMV7)
    assert cpu["model"] == "Raspberry Pi 4 Model B Rev 1.2 (Cortex-A72)"
    assert cpu["isa"] == ["NEON"]


def test_empty_cpuinfo_gives_unknowns_not_guesses():
    assert sysinfo.parse_cpuinfo("") == {"model": None, "isa": [], "physical_cores": None, "processors": 0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_this_process_memory_and_scheduling():
    current = sysinfo.current_rss_bytes()
    # The kernel's RSS counters are per-CPU and read approximately; allow them 1 MiB of slack.
    assert sysinfo.peak_rss_bytes() >= current - (1 << 20) > 0
    wait = sysinfo.runqueue_wait_s()
    assert wait is not None and wait >= 0
    info = sysinfo.system_info()
    assert info["usable_cores"] >= 1
    assert set(info["isa_summary"]) == set(sysinfo.HEADLINE_ISA)
    assert info["onnxruntime"] and info["numpy"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_fresh_child_does_not_inherit_the_parents_peak():
    ballast = np.ones(300 * 2**20, np.uint8)  # 300 MiB resident in this process
    code = "from tinysam_rt.sysinfo import peak_rss_bytes; print(peak_rss_bytes())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 200 * 2**20  # the interpreter alone, not parent + child
    assert sysinfo.peak_rss_bytes() >= ballast.nbytes
