"""Build (once, cached) an emulated aarch64 Debian + CPython with the tinysam-rt wheel's deps.

No binfmt and no chroot: qemu-user is called explicitly with `-L ROOT`, which makes the guest's
absolute paths resolve inside ROOT when the file exists there (its dynamic loader, libc, Python)
and on the host otherwise (the model, the image, this repository).

Why the fake /proc/cpuinfo: qemu-user 7.2 (Debian bookworm's) does not emulate /proc/cpuinfo for
aarch64 guests, so they read the x86-64 host's. onnxruntime's bundled cpuinfo library then finds zero ARM
processors; up to onnxruntime 1.27 it prints "Unknown CPU vendor" and goes on, from 1.28 on it
dereferences NULL while reading cache topology and the import segfaults. A real board, and
qemu 10.0 (Debian trixie's, which emulates the file), show a proper ARM /proc/cpuinfo, so the check
writes one that matches the emulated core into ROOT/proc/cpuinfo (a qemu that emulates the file
serves its own instead).

Every step raises `EnvError` with what failed and how to fix it; the caller exits non-zero.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

DEBIAN_MIRROR = "http://deb.debian.org/debian"
GUEST_PYTHON = "usr/bin/python3.11"
GUEST_PY_VERSION = "3.11"
# Tags pip may pick for the guest: Debian bookworm's glibc 2.36 runs both.
PLATFORM_TAGS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
STAMP = ".tinysam-rootfs-complete"

# /proc/cpuinfo of the boards each qemu core stands for. Features are the boards' own (a Pi 4's
# BCM2711 has no crypto extension although qemu's cortex-a72 model does); the MIDR fields are
# what onnxruntime's cpuinfo uses to pick kernels.
CPUINFO = {
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm crc32 cpuid"),  # Raspberry Pi 4
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                                        "asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),  # Raspberry Pi 5
    "neoverse-n1": ("0x3", "0xd0c", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                                         "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"),
}


class EnvError(RuntimeError):
    """The emulated environment could not be built or does not run; the message says why."""


def run_checked(cmd, what, **kwargs):
    """subprocess.run that raises EnvError with the command's last output lines on failure."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise EnvError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


def find_qemu():
    """Path of qemu-aarch64-static (Debian's qemu-user-static) or qemu-aarch64 (qemu-user >= 9)."""
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_tools(install):
    """Make sure qemu-user, debootstrap and dpkg exist; apt-get install them when allowed.

    Returns:
        path of the qemu-aarch64 binary.
    """
    missing = [n for n, ok in (("qemu-user-static", find_qemu()), ("debootstrap", shutil.which("debootstrap")),
                               ("dpkg", shutil.which("dpkg"))) if not ok]
    if missing and install:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise EnvError(f"missing {', '.join(missing)}; install them (Debian/Ubuntu: "
                           f"sudo apt-get install qemu-user-static debootstrap) and run again")
        run_checked(["apt-get", "update"], "apt-get update")
        run_checked(["apt-get", "install", "-y", "--no-install-recommends", *missing], "apt-get install")
    elif missing:
        raise EnvError(f"missing {', '.join(missing)} and --no-install was given; "
                       f"apt-get install qemu-user-static debootstrap")
    qemu = find_qemu()
    if qemu is None:
        raise EnvError("qemu-aarch64-static still not found after installing qemu-user-static")
    return qemu


def qemu_version(qemu):
    """'7.2.22'-style version string of the qemu binary."""
    out = run_checked([qemu, "--version"], "qemu --version")
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.splitlines()[0]


def host_debian_mirror():
    """The first Debian (non-security) archive URI in this machine's apt sources, else deb.debian.org."""
    uris = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not (path.is_file() and path.suffix in ("", ".list", ".sources")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0]  # commented-out snapshot mirrors are not in use
            # one-line format: "deb [opts] URI suite ..."; deb822 format: "URIs: URI ..."
            match = re.match(r"\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", line)
            if match:
                uris.append(match.group(1).rstrip("/"))
    for uri in uris:
        if re.match(r"https?://\S+/debian$", uri):
            return uri
    return DEBIAN_MIRROR


def write_cpuinfo(root, cpu):
    """Write ROOT/proc/cpuinfo for the emulated core, one entry per host CPU the guest sees in /sys.

    The guest reads the host's /sys/devices/system/cpu (qemu does not fake it), so the processor
    count must match the host's "present" list or cpuinfo's tables disagree.
    """
    present = Path("/sys/devices/system/cpu/present").read_text().strip()
    count = 0
    for part in present.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    # Other -cpu models (max, a64fx, ...) get a Neoverse-N1 description: an ARMv8.2 server core,
    # close enough for cpuinfo's vendor/uarch tables; the features onnxruntime dispatches on
    # come from the auxiliary vector, which qemu fills for the emulated core.
    variant, part, revision, features = CPUINFO.get(cpu, CPUINFO["neoverse-n1"])
    entry = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: {v}\nCPU part\t: {p}\nCPU revision\t: {r}\n\n")
    text = "".join(entry.format(n=n, f=features, v=variant, p=part, r=revision) for n in range(count))
    (root / "proc").mkdir(exist_ok=True)
    tmp = root / "proc" / ".cpuinfo.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "proc" / "cpuinfo")


def build_rootfs(cache, suite, mirror, qemu, progress):
    """A minimal arm64 Debian root with python3, under CACHE/rootfs-arm64-SUITE (built once).

    debootstrap --foreign only downloads and unpacks the required set (it runs nothing); the
    `--include`d python3 packages are downloaded but not unpacked, so every downloaded .deb is
    unpacked again with `dpkg -x`. Built in a temp dir and renamed: a failed build leaves nothing.
    """
    root = cache / f"rootfs-arm64-{suite}"
    if (root / STAMP).is_file():
        return root
    if root.exists():
        shutil.rmtree(root)  # a previous build died before its stamp
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".rootfs-{suite}-", dir=cache))
    try:
        progress(f"debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 {suite} ({mirror})")
        run_checked(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
                     suite, str(tmp), mirror], "debootstrap")
        debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        progress(f"dpkg -x {len(debs)} packages")
        for deb in debs:
            run_checked(["dpkg", "-x", str(deb), str(tmp)], f"dpkg -x {deb.name}")
        if not (tmp / GUEST_PYTHON).is_file():
            raise EnvError(f"the {suite} arm64 root has no /{GUEST_PYTHON}; only Python {GUEST_PY_VERSION} "
                           f"suites (bookworm) are supported")
        out = run_checked([qemu, "-L", str(tmp), str(tmp / GUEST_PYTHON), "-c",
                           "import platform; print(platform.machine())"], "first run of the aarch64 python")
        if out.strip() != "aarch64":
            raise EnvError(f"the emulated python reports machine {out.strip()!r}, expected 'aarch64'")
        (tmp / STAMP).write_text(json.dumps({"suite": suite, "mirror": mirror, "debs": len(debs)}) + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def build_wheel(repo, out_dir):
    """`pip wheel --no-deps` of a copy of the repo (the shared work tree gets no build/ dirs).

    Returns:
        Path of the built tinysam_rt-*.whl.
    """
    src = Path(tempfile.mkdtemp(prefix="src-", dir=out_dir))
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*", "*.onnx")
    for name in ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, src / name)
    for name in ("tinysam_rt", "export"):
        shutil.copytree(repo / name, src / name, ignore=ignore)
    dist = out_dir / "dist"
    run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(dist), str(src)], "building the tinysam-rt wheel")
    shutil.rmtree(src)
    wheels = sorted(dist.glob("tinysam_rt-*.whl"))
    if len(wheels) != 1:
        raise EnvError(f"expected one tinysam_rt wheel in {dist}, found {[w.name for w in wheels]}")
    return wheels[0]


def wheel_metadata(wheel):
    """(runtime Requires-Dist list without extras, {console script: 'module:func'}) of a wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(meta).decode())
        entry = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        scripts = {}
        if entry:
            section = None
            for line in archive.read(entry).decode().splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line.strip("[]")
                elif "=" in line and section == "console_scripts":
                    key, value = (s.strip() for s in line.split("=", 1))
                    scripts[key] = value
    requires = [r for r in message.get_all("Requires-Dist") or [] if ";" not in r]
    return requires, scripts


def pin_requirements(requires, onnxruntime_version):
    """Replace the onnxruntime requirement by ==VERSION (to test one release); others unchanged."""
    if onnxruntime_version is None:
        return list(requires)
    out = [r for r in requires if not re.match(r"onnxruntime\b(?![-_])", r)]
    return out + [f"onnxruntime=={onnxruntime_version}"]


def install_guest_site(cache, requires, progress):
    """aarch64 cp311 wheels of `requires` in CACHE/site-<key>, keyed by the requirement list.

    pip resolves as a Pi with Python 3.11 would (`--platform ... --only-binary=:all:`), so a
    dependency without an aarch64 wheel fails here, as it would on the board.
    """
    key = hashlib.sha256(json.dumps([sorted(requires), PLATFORM_TAGS, GUEST_PY_VERSION]).encode()).hexdigest()[:12]
    site = cache / f"site-{key}"
    if (site / STAMP).is_file():
        return site
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=cache))
    try:
        progress(f"pip install aarch64 cp{GUEST_PY_VERSION.replace('.', '')} wheels: {' '.join(requires)}")
        platforms = [arg for tag in PLATFORM_TAGS for arg in ("--platform", tag)]
        run_checked([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     "--target", str(tmp), *platforms, "--only-binary=:all:", "--python-version", GUEST_PY_VERSION,
                     "--implementation", "cp", *requires], "installing aarch64 wheels")
        (tmp / STAMP).write_text(json.dumps(requires) + "\n")
        if site.exists():
            shutil.rmtree(site)
        os.replace(tmp, site)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return site


def install_wheel_only(wheel, target):
    """The (pure-Python) tinysam-rt wheel alone into `target` (its deps come from the site cache)."""
    run_checked([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 "--no-deps", "--target", str(target), str(wheel)], "installing the tinysam-rt wheel")
    return target


def guest_command(qemu, cpu, root, python_path, argv):
    """argv for running the guest python under qemu-user with the given sys.path additions.

    Host variables that name host libraries or tune host-CPU kernels are removed from the guest.
    """
    cmd = [qemu]
    if cpu:
        cmd += ["-cpu", cpu]
    cmd += ["-L", str(root), "-E", "PYTHONPATH=" + os.pathsep.join(map(str, python_path))]
    for name in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            cmd += ["-U", name]
    return cmd + [str(root / GUEST_PYTHON), *map(str, argv)]
