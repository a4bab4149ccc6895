"""TFLOP/s of Qwen2.5-7B's projection GEMMs at micro batch 4 x 2048 through torch's two cuBLAS
routes (cublas = cublasGemmEx, cublaslt = cublasLt's heuristic), in trainer's weight layout
(`[in, out]` row-major: forward `x @ w`, dx `dy @ w.T`) and in torch's (`[out, in]`: forward
`x @ w.T`, dx `dy @ w`). On the GPU machine: `python3 benches/gemm_shapes.py [--tokens N]`;
one JSON line per case, then a table. Set beside trainer's `--profile` GEMM spans."""
import argparse
import json

import torch

SHAPES = {  # name: (in, out) of Qwen2.5-7B's projections, q/k/v and gate/up packed
    "qkv": (3584, 4608),
    "o": (3584, 3584),
    "gate_up": (3584, 37888),
    "down": (18944, 3584),
}


def timed(fn, reps):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4 * 2048)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    m = args.tokens
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
            w_in_out = torch.randn(k, n, device=dev, dtype=torch.bfloat16) * 0.02
            w_out_in = w_in_out.t().contiguous()
            flops = 2 * m * k * n
            cases = {
                ("forward", "trainer [in,out]"): lambda: x @ w_in_out,
                ("forward", "torch [out,in]"): lambda: x @ w_out_in.t(),
                ("dx", "trainer [in,out]"): lambda: dy @ w_in_out.t(),
                ("dx", "torch [out,in]"): lambda: dy @ w_out_in,
            }
            for (op, layout), fn in cases.items():
                s = timed(fn, args.reps)
                row = {"library": library, "gemm": name, "op": op, "layout": layout, "m": m, "k": k, "n": n,
                       "ms": round(s * 1e3, 4), "tflops": round(flops / s / 1e12, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del x, dy, w_in_out, w_out_in
    print(f"\n{'gemm':8} {'op':8} {'layout':18} {'cublas TF/s':>12} {'cublaslt TF/s':>14}")
    for r in rows:
        if r["library"] != "cublas":
            continue
        lt = next(o for o in rows if o["library"] == "cublaslt" and all(o[f] == r[f] for f in ("gemm", "op", "layout")))
        print(f"{r['gemm']:8} {r['op']:8} {r['layout']:18} {r['tflops']:12.1f} {lt['tflops']:14.1f}")


if __name__ == "__main__":
    main()
