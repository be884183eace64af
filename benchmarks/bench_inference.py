"""Inference at real TinyGPT-V size on this machine: every precision side by side with the baseline.

    python benchmarks/bench_inference.py                        # tinygptv-phi2: bf16, int8, int4
    python benchmarks/bench_inference.py --preset tinygptv-micro --modes fp32 int8

Each precision runs as its own ``tinygptv bench --json`` process (its own peak RSS); each also
measures the baseline (transformers ``generate`` on the bf16 model) and the bandwidth limit.

The processes get ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: on a shared 2-core machine, OpenMP
threads that spin while waiting for each other collapse when another process holds a core (measured
here: a micro model decoding at 3 tok/s instead of 500).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--modes", nargs="+", default=["none", "int8", "int4"], choices=["none", "fp32", "int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, "-m", "tinygptv", "bench", "--preset", args.preset, "--quantize", mode, "--json",
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["mode"] = {"none": "bf16"}.get(mode, mode)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.preset}, {args.threads} threads")
    print("| precision | encode s | TTFT s | decode tok/s | limit tok/s | peak RSS GB | baseline decode tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['encode_s']} | {r['ttft_s']} | {r['decode_tok_s']} | {r['limit_decode_tok_s']} | "
              f"{r['peak_rss_gb']} | {r['baseline_decode_tok_s']} | {r['speedup_vs_baseline']}x |")
    if rows:
        print(f"read bandwidth {rows[0]['bandwidth_gbs']} GB/s; baseline = transformers generate with inputs_embeds, bf16")


if __name__ == "__main__":
    main()
