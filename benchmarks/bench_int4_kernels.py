"""The CPU matmul kernels for weight-only layers, side by side at Phi-2's shapes.

    python benchmarks/bench_int4_kernels.py                  # 16 decoder layers, 1 and 73 tokens, 2 threads
    python benchmarks/bench_int4_kernels.py --layers 32 --tokens 1

Each kernel runs the six Linear layers of a Phi-2 decoder layer (q, k, v, dense: 2560 x 2560; fc1,
fc2: 2560 x 10240 and back) for ``--layers`` layers with distinct weights, so the weights come from memory, as in
decoding, and not from the cache (one layer's int8 weights, 79 MB, would not fit in it, but one
matrix would). Rows: fbgemm int8 (what ``--quantize int8`` runs), torch's int4 kernel
(``aten._weight_int4pack_mm_for_cpu``, bf16 activations) and onnxruntime's ``MatMulNBits`` int4
(``OrtInt4Matmul``; int8 activations per group), each as ms per decoder layer, and the weight bytes
read per layer over that time. Weights are random codes (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

SHAPES = [(2560, 2560)] * 4 + [(2560, 10240), (10240, 2560)]  # (in, out): q, k, v, dense, fc1, fc2 of Phi-2


def build(kind: str, layers: int):
    import torch

    from tinygptv.quantize import INT4_KERNEL_ENV, Int4Linear, Int8Linear, release_freed_memory

    gen = torch.Generator().manual_seed(0)
    modules = []
    for _ in range(layers):
        for k, n in SHAPES:
            if kind == "int8 fbgemm":
                m = Int8Linear(k, n, bias=False)
                m.qweight.copy_(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
                m.scale.copy_(torch.rand(n, generator=gen) * 1e-3 + 1e-4)
            else:
                m = Int4Linear(k, n, bias=False)
                m.qweight.copy_(torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8))
                m.scale.copy_((torch.rand(n, k // m.group_size, generator=gen) * 1e-3 + 1e-4).bfloat16().float())
                m.zero.copy_((torch.randn(n, k // m.group_size, generator=gen) * 1e-3).bfloat16().float())
            os.environ[INT4_KERNEL_ENV] = "onnxruntime" if kind == "int4 onnxruntime" else "torch"
            m.pack()
            modules.append(m)
    release_freed_memory()
    return modules


def main() -> None:
    import psutil
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 73])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.layers} layers of Phi-2's shapes, {args.threads} threads, {args.repeats} sweeps after one warm-up")
    print(f"{'kernel':<18} {'tokens':>6} {'ms/layer':>9} {'GB/s':>6} {'RSS GB':>7}")
    for kind in ("int8 fbgemm", "int4 torch", "int4 onnxruntime"):
        modules = build(kind, args.layers)
        nbytes = sum(m.weight_nbytes() for m in modules) / args.layers
        rss = psutil.Process().memory_info().rss / 1e9
        for tokens in args.tokens:
            xs = [torch.randn(tokens, k) for _ in range(args.layers) for k, _ in SHAPES]
            with torch.inference_mode():
                for m, x in zip(modules, xs):
                    m(x)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    for m, x in zip(modules, xs):
                        m(x)
                ms = (time.perf_counter() - start) / args.repeats / args.layers * 1e3
            print(f"{kind:<18} {tokens:>6} {ms:>9.2f} {nbytes / ms / 1e6:>6.1f} {rss:>7.2f}", flush=True)
        del modules
        gc.collect()


if __name__ == "__main__":
    main()
