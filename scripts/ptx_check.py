#!/usr/bin/env python3
"""Compile the CUDA kernels as the crate does (NVRTC, one module: dilated.cu + hopper.cu +
ring/gpu.cu) and assemble them with ptxas, on a machine without a GPU or a CUDA install.

Prints, per kernel: registers, stack and spill bytes, and every ptxas/NVRTC remark about
the wgmma pipeline (C7514 "wgmma ... serialized" gives an overlap away; C7519 notes an
injected warpgroup.arrive). For the warp-specialised kernels the register count is the
launch's (384 threads: 168); their warpgroups run under setmaxnreg, and a spill in either
shows in the spill columns. With --base REV, also the kernels whose numbers differ from
those of the same sources at git revision REV. With --sass KERNEL, the kernel's SASS
(cuobjdump and nvdisasm from their wheels; 13.2, the oldest on PyPI, reads 13.0's cubins),
to read where ptxas put moves, branches and waits; with --base too, a diff against REV's.
With --waits KERNEL[,KERNEL...], each kernel's wgmma waits in SASS order with the MUFU.EX2
(exponentials) between them (with --base, of REV's sources): whether a softmax meant to
run under an MMA sits before the wait for that MMA (ptxas schedules waits freely within a
basic block; stop 22 found the overlapped forward's softmax after its wait for P·V).

NVRTC and ptxas come from NVIDIA's PyPI wheels (nvidia-cuda-nvrtc, nvidia-cuda-nvcc, the
CUDA version of the GPU machine, 13.0), downloaded once into a cache folder
($DILATED_PTX_CACHE, default ~/.cache/dilated-attention-ptx). They are tools for
developers only, never a dependency of the crate.

    python3 scripts/ptx_check.py [--arch sm_90a] [--only REGEX] [--base REV] [--sass KERNEL]
                                 [--waits KERNEL[,KERNEL...]]
"""

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["src/ops/dilated/dilated.cu", "src/ops/dilated/hopper.cu", "src/ring/gpu.cu"]
WHEELS = ["nvidia-cuda-nvrtc==13.0.*", "nvidia-cuda-nvcc==13.0.*"]
SASS_WHEELS = ["nvidia-cuda-cuobjdump==13.2.*", "nvidia-cuda-nvdisasm==13.2.*"]


def cache_dir():
    return os.environ.get("DILATED_PTX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dilated-attention-ptx")


def fetch(wheels, dest):
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dl]
                       + wheels, check=True)
        for w in os.listdir(dl):
            with zipfile.ZipFile(os.path.join(dl, w)) as z:
                z.extractall(dest)


def sass_tools():
    """cuobjdump (which runs nvdisasm from PATH), fetched once into the cache."""
    dest = os.path.join(cache_dir(), "sass")
    bindir = os.path.join(dest, "nvidia", "cu13", "bin")
    tools = [os.path.join(bindir, t) for t in ("cuobjdump", "nvdisasm")]
    if not all(os.path.exists(t) for t in tools):
        fetch(SASS_WHEELS, dest)
    for t in tools:
        os.chmod(t, 0o755)
    return tools[0], bindir


def sass(lib, ptxas, src, arch, kernel):
    ptx, _ = compile_ptx(lib, src, arch)
    cuobjdump, bindir = sass_tools()
    with tempfile.TemporaryDirectory() as d:
        path, cubin = os.path.join(d, "m.ptx"), os.path.join(d, "m.cubin")
        open(path, "wb").write(ptx)
        subprocess.run([ptxas, f"-arch={arch}", path, "-o", cubin], check=True,
                       capture_output=True)
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        out = subprocess.run([cuobjdump, "-sass", "-fun", kernel, cubin], env=env,
                             capture_output=True, text=True, check=True).stdout
    # Drop addresses and encodings, so that two versions diff by instruction.
    return [re.sub(r"/\*[0-9a-f]{4,}\*/|/\* 0x[0-9a-f]+ \*/", "", l).rstrip()
            for l in out.splitlines() if l.strip() and not l.strip().startswith("/* 0x")]


def waits(lib, ptxas, src, arch, names):
    """Per kernel: its wgmma waits and the exponentials between them, in SASS order."""
    ptx, _ = compile_ptx(lib, src, arch)
    cuobjdump, bindir = sass_tools()
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as d:
        path, cubin = os.path.join(d, "m.ptx"), os.path.join(d, "m.cubin")
        open(path, "wb").write(ptx)
        entries = [x for n in names for x in ("-e", n)]
        subprocess.run([ptxas, f"-arch={arch}", path, "-o", cubin] + entries, check=True,
                       capture_output=True)
        for n in names:
            out = subprocess.run([cuobjdump, "-sass", "-fun", n, cubin], env=env,
                                 capture_output=True, text=True, check=True).stdout
            seq, ex2 = [], 0
            for line in out.splitlines():
                if "MUFU.EX2" in line:
                    ex2 += 1
                m = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", line)
                if m:
                    if ex2:
                        seq.append(f"{ex2} EX2")
                    seq.append(f"wait<={int(m.group(1), 16)}")
                    ex2 = 0
            if ex2:
                seq.append(f"{ex2} EX2")
            print(f"{n}: " + " | ".join(seq))


def toolkit():
    cache = cache_dir()
    lib = os.path.join(cache, "nvidia", "cu13", "lib")
    ptxas = os.path.join(cache, "nvidia", "cu13", "bin", "ptxas")
    if not (os.path.exists(os.path.join(lib, "libnvrtc.so.13")) and os.path.exists(ptxas)):
        fetch(WHEELS, cache)
        os.chmod(ptxas, 0o755)
    return lib, ptxas


def sources_at(rev):
    if rev is None:
        return "\n".join(open(os.path.join(ROOT, p)).read() for p in SOURCES)
    return "\n".join(subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{p}"], check=True,
                                    capture_output=True, text=True).stdout for p in SOURCES)


def compile_ptx(lib, src, arch):
    # libnvrtc loads libnvrtc-builtins from the loader path: preload it from the cache.
    ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    nv = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"dilated.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit("NVRTC failed:\n" + log.value.decode())
    nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetPTX(prog, ptx)
    return ptx.value, log.value.decode()


def kernels(lib, ptxas, src, arch):
    ptx, log = compile_ptx(lib, src, arch)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.ptx")
        open(path, "wb").write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True)
    text = log + out.stderr
    if out.returncode:
        sys.exit("ptxas failed:\n" + out.stderr[-4000:])
    found = re.findall(
        r"Compiling entry function '(\w+)'.*?\n.*?Function properties for \w+\n\s+(\d+) bytes "
        r"stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) "
        r"registers", text)
    stats = {k: (int(r), int(st), int(ss), int(sl)) for k, st, ss, sl, r in found}
    remarks = {}
    for m in re.finditer(r"\((C75\d\d)\)[^\n]*function '(\w+)'", text):
        remarks.setdefault(m.group(2), set()).add(m.group(1))
    return stats, remarks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--only", default=".", help="regex over kernel names")
    ap.add_argument("--base", help="git revision to compare with")
    ap.add_argument("--sass", metavar="KERNEL", help="print (or with --base, diff) its SASS")
    ap.add_argument("--waits", metavar="KERNELS",
                    help="comma-separated kernels: their wgmma waits and the exponentials between")
    a = ap.parse_args()
    lib, ptxas = toolkit()
    if a.waits:
        waits(lib, ptxas, sources_at(a.base), a.arch, a.waits.split(","))
        return
    if a.sass:
        new = sass(lib, ptxas, sources_at(None), a.arch, a.sass)
        if not a.base:
            print("\n".join(new))
            return
        old = sass(lib, ptxas, sources_at(a.base), a.arch, a.sass)
        import difflib
        diff = list(difflib.unified_diff(old, new, a.base, "working tree", lineterm=""))
        print("\n".join(diff) if diff else f"{a.sass}: SASS identical to {a.base}'s")
        return
    stats, remarks = kernels(lib, ptxas, sources_at(None), a.arch)
    sel = sorted(k for k in stats if re.search(a.only, k))
    print(f"{'kernel':28} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}  remarks")
    for k in sel:
        r, st, ss, sl = stats[k]
        print(f"{k:28} {r:5} {st:6} {ss:9} {sl:9}  {' '.join(sorted(remarks.get(k, [])))}")
    if a.base:
        old, _ = kernels(lib, ptxas, sources_at(a.base), a.arch)
        changed = [k for k in sel if old.get(k) != stats[k]]
        print(f"\nagainst {a.base}: {len(changed)} of {len(sel)} kernels differ")
        for k in changed:
            print(f"  {k}: {old.get(k)} -> {stats[k]}  (regs, stack, spill stores, spill loads)")


if __name__ == "__main__":
    main()
