#!/usr/bin/env python3
"""Registers and spills of CubeCL's CUDA kernels, off the GPU machine.

CubeCL logs the CUDA source of every kernel it compiles when cubecl.toml asks for it:

    [compilation]
    logger = { level = "full", file = "/tmp/r/kernels.log" }

(benches/calls/s28-call1.sh does this on the GPU machine and brings the log back). This script
splits such a log (plain or .xz) into one source per kernel and comptime configuration, compiles
each as CubeCL does (NVRTC, --gpu-architecture=sm_90a) and runs ptxas -v on the PTX, printing
registers, stack and spills a kernel: the numbers ncu's LaunchStats gives, without device time.
NVRTC, ptxas and the CUDA headers come from NVIDIA's PyPI wheels, installed on first use under
.whl/cuda (git-ignored).

    python3 benches/kernel_regs.py kernels.log.xz [--match flash] [--out DIR] [--launch-bounds N] [--sass]

--launch-bounds N compiles each kernel as if it asked for N cubes an SM (ptxas then caps its
registers): what a kernel would spill at that occupancy. --out keeps the sources and PTX.
--sass disassembles each (nvdisasm from NVIDIA's CUDA 13 wheel) and prints static instruction
counts (tensor-core products, ldmatrix, cp.async, global loads, barriers).
"""
import argparse
import ctypes
import lzma
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl", "cuda")
PACKAGES = ["nvidia-cuda-nvrtc-cu12==12.8.93", "nvidia-cuda-nvcc-cu12==12.8.93", "nvidia-cuda-runtime-cu12==12.8.90", "nvidia-cuda-cccl-cu12==12.8.90"]
# The disassembler is published for CUDA 13 only; it reads sm_90a cubins from ptxas 12.8.
NVDISASM = "nvidia-cuda-nvdisasm==13.2.78"


def toolchain():
    """NVRTC's library, ptxas and the include folders, installing the wheels if missing."""
    nv = os.path.join(WHEELS, "nvidia")
    nvrtc = os.path.join(nv, "cuda_nvrtc", "lib", "libnvrtc.so.12")
    ptxas = os.path.join(nv, "cuda_nvcc", "bin", "ptxas")
    cccl = os.path.join(nv, "cuda_cccl", "include")
    if not (os.path.exists(nvrtc) and os.path.exists(ptxas) and os.path.exists(cccl)):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", WHEELS, *PACKAGES], check=True)
    os.chmod(ptxas, 0o755)
    includes = [os.path.join(nv, "cuda_runtime", "include"), os.path.join(nv, "cuda_nvcc", "include"), cccl]
    return ctypes.CDLL(nvrtc), ptxas, includes


def nvdisasm():
    """The SASS disassembler, installing its wheel (under .whl/nvdisasm) if missing."""
    folder = os.path.join(ROOT, ".whl", "nvdisasm")
    path = os.path.join(folder, "nvidia", "cu13", "bin", "nvdisasm")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder, NVDISASM], check=True)
    os.chmod(path, 0o755)
    return path


def sass_counts(sass):
    """Static counts of the instructions that matter to a tensor-core kernel's loop."""
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    wanted = ["HMMA", "LDSM", "LDGSTS", "LDG", "STS", "LDS", "BAR", "SYNCS", "MUFU", "BRA"]
    return " ".join(f"{op}={ops.count(op)}" for op in wanted if ops.count(op))


def kernels(log_text):
    """(name, source) of each kernel in a CubeCL compilation log, the first of each configuration."""
    seen = set()
    for entry in log_text.split("[START_KERNEL_COMPILATION]")[1:]:
        source = re.search(r"```cpp\n(.*?)```", entry, re.S)
        if not source:
            continue
        name = re.search(r"__global__ void __launch_bounds__\(\d+\)\s*(\w+)", source.group(1)).group(1)
        # The comptime arguments distinguish configurations of one kernel (head dim, causal...).
        info = re.search(r"info: \w+Info \{(.*?)\n    \},\n\}", entry, re.S)
        comptime = re.findall(r"^        (\w+): (\w+),$", info.group(1), re.M) if info else []
        key = name + "".join(f"_{k}{v}" for k, v in comptime if v.isdigit() or v in ("true", "false"))
        if key not in seen:
            seen.add(key)
            yield key, source.group(1)


def compile_ptx(lib, includes, source):
    """PTX of `source` by NVRTC with CubeCL's options, or raises with NVRTC's log."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=sm_90a", b"-lineinfo"] + [f"--include-path={i}".encode() for i in includes]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    if rc != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.value.decode(errors="replace")[-2000:])
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", help="CubeCL compilation log (plain or .xz)")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    ap.add_argument("--out", help="folder to keep each kernel's .cu and .ptx in")
    ap.add_argument("--launch-bounds", type=int, help="compile as __launch_bounds__(units, N)")
    ap.add_argument("--sass", action="store_true", help="also disassemble (nvdisasm), keep .sass, count the loop's instructions")
    args = ap.parse_args()
    opener = lzma.open if args.log.endswith(".xz") else open
    with opener(args.log, "rt") as f:
        text = f.read()
    lib, ptxas, includes = toolchain()
    out = args.out or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    print(f"{'kernel':<72} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    for key, source in kernels(text):
        if args.match not in key:
            continue
        if args.launch_bounds:
            source = re.sub(r"__launch_bounds__\((\d+)\)", rf"__launch_bounds__(\1, {args.launch_bounds})", source, count=1)
        with open(os.path.join(out, key + ".cu"), "w") as f:
            f.write(source)
        try:
            ptx = compile_ptx(lib, includes, source)
        except RuntimeError as e:
            print(f"{key:<72} NVRTC failed: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        ptx_path = os.path.join(out, key + ".ptx")
        with open(ptx_path, "wb") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", info)
        stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
        if not (regs and stack):
            print(f"{key:<72} ptxas: {info.strip().splitlines()[-1] if info.strip() else 'no report'}")
            continue
        print(f"{key:<72} {regs.group(1):>5} {stack.group(1):>6} {stack.group(2):>9} {stack.group(3):>9}")
        if args.sass:
            cubin = os.path.join(out, key + ".cubin")
            subprocess.run([ptxas, "-arch=sm_90a", ptx_path, "-o", cubin], check=True)
            sass = subprocess.run([nvdisasm(), "-c", cubin], capture_output=True, text=True).stdout
            with open(os.path.join(out, key + ".sass"), "w") as f:
                f.write(sass)
            print(f"    {sass_counts(sass)}")


if __name__ == "__main__":
    main()
