"""Quality gate of the CPU quantization at real size: last-token logits of int8 / int4 against bf16.

    python benchmarks/bench_quantize_quality.py                      # tinygptv-phi2, 2 threads
    python benchmarks/bench_quantize_quality.py --preset tinygptv-micro

Each precision builds the same random-weight model (the weights are drawn in float32 from one seed,
then rounded to bf16 or quantized) in its own process, as ``tinygptv bench`` does, and computes the
logits at the last position of one image + 40 text tokens. The gate (issue 6): cosine similarity to
bf16 >= 0.99 for int8 and >= 0.98 for int4. Prints one JSON line per precision, then a verdict; the
exit code is 1 if a gate fails. Needs ~9 GB (the bf16 model) and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GATES = {"int8": 0.99, "int4": 0.98}


def logits_in_child(preset: str, mode: str, threads: int, out: Path) -> None:
    code = (
        f"import torch; torch.set_num_threads({threads}); from tinygptv.bench import last_token_logits; "
        f"torch.save(last_token_logits({preset!r}, {mode!r}), {str(out)!r})"
    )
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # see bench_inference.py
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        logits = {}
        for mode in ("bf16", "int8", "int4"):
            logits_in_child(args.preset, mode, args.threads, Path(tmp) / f"{mode}.pt")
            logits[mode] = torch.load(Path(tmp) / f"{mode}.pt", weights_only=True)
        ref = logits["bf16"]
        for mode, gate in GATES.items():
            cos = torch.nn.functional.cosine_similarity(logits[mode], ref, dim=0).item()
            top1 = bool(logits[mode].argmax() == ref.argmax())
            passed = cos >= gate
            ok &= passed
            row = {"preset": args.preset, "quantize": mode, "reference": "bf16", "cosine": round(cos, 5), "gate": gate,
                   "passed": passed, "same_top1": top1}
            print(json.dumps(row), flush=True)
    print("quality gate:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
