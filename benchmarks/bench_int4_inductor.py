"""torch's int4 and int8 weight-only kernels in eager mode against Inductor's CPU GEMM templates.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int4_inductor.py            # int4, 8 layers
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_int4_inductor.py --kind int8 --layers 4

Runs the six Linear layers of ``--layers`` Phi-2 decoder layers (q, k, v, dense: 2560 x 2560;
fc1 2560 -> 10240 with tanh-GELU, fc2 back; distinct random weights, so they come from memory)
on bf16 activations through ``aten._weight_int4pack_mm_for_cpu`` (what ``--quantize int4`` runs;
group 64) or ``aten._weight_int8pack_mm``, first eagerly, then under ``torch.compile`` with
Inductor's freezing and max-autotune, where Inductor may replace each call by a C++ GEMM template of
its own (on CPUs with AMX, an AMX micro-kernel; it prints the autotuning choices). Times one
token and ``--tokens`` tokens (a prompt), in ms per decoder layer (minimum and median of
``--repeats``), and the compile time of the first call of each shape, which a user would pay
once per process (Inductor caches compiled code on disk between processes).
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = [(2560, 2560)] * 4 + [(2560, 10240), (10240, 2560)]  # (in, out): q, k, v, dense, fc1, fc2 of Phi-2


def build(kind: str, layers: int, group: int):
    import torch

    g = torch.Generator().manual_seed(0)

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for layer in range(layers):
                for i, (k, n) in enumerate(SHAPES):
                    if kind == "int4":
                        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
                        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                        scale_zero = (torch.rand(k // group, n, 2, generator=g) * 1e-3).bfloat16()
                    else:
                        packed = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
                        scale_zero = (torch.rand(n, generator=g) * 1e-3).bfloat16()
                    self.register_buffer(f"w{layer}_{i}", packed)
                    self.register_buffer(f"s{layer}_{i}", scale_zero)

        def forward(self, x):
            out = x.new_zeros(())
            for layer in range(layers):
                for i in range(len(SHAPES)):
                    w, s = getattr(self, f"w{layer}_{i}"), getattr(self, f"s{layer}_{i}")
                    inp = hidden if i == 5 else x
                    if kind == "int4":
                        y = torch.ops.aten._weight_int4pack_mm_for_cpu(inp, w, group, s)
                    else:
                        y = torch.ops.aten._weight_int8pack_mm(inp, w, s)
                    if i == 4:
                        hidden = torch.nn.functional.gelu(y, approximate="tanh")
                    else:
                        out = out + y.float().sum()
            return out

    return Layers().eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="int4", choices=["int4", "int8"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=73)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    import torch._inductor.config as inductor

    torch.set_num_threads(args.threads)
    model = build(args.kind, args.layers, 64)
    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    runs = {"eager": model, "inductor": torch.compile(model)}
    print(f"{args.kind}, {args.layers} Phi-2 decoder layers' Linear layers, bf16 activations, {args.threads} threads")
    print(f"{'path':<10}{'tokens':>7}{'first call s':>14}{'ms/layer min':>14}{'median':>9}")
    for tokens in (1, args.tokens):
        x = torch.randn(tokens, 2560).bfloat16()
        for name, run in runs.items():
            with torch.no_grad():
                t = time.perf_counter()
                run(x)
                first = time.perf_counter() - t
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    run(x)
                    times.append((time.perf_counter() - t) / args.layers * 1e3)
            print(f"{name:<10}{tokens:>7}{first:>14.1f}{min(times):>14.2f}{statistics.median(times):>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
