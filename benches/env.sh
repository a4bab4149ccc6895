# Sourced by the GPU-machine scripts: CUDA's libraries on the loader's path (libcupti too: trainer
# finds CubeCL's compute stream through it), NVLink multicast off, CubeCL's kernel and autotune
# caches in .cubecl-cache/ (carry it to the next fresh machine to skip recompiling), and the
# binaries carried in .gpu/ (xz-compressed) unpacked.
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0
for d in /usr/local/cuda/extras/CUPTI/lib64 /usr/local/cuda-13.0/extras/CUPTI/lib64 \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
  if ls "$d"/libcupti.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; break; fi
done
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
[ -f cubecl.toml ] || printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
for f in .gpu/*.xz; do [ -e "$f" ] && xz -d -f "$f" && chmod +x "${f%.xz}"; done
true
