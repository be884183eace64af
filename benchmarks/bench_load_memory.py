"""Peak RSS of ``TinyGPTV.from_pretrained`` on a real-size model, against the size of its weights.

    python benchmarks/bench_load_memory.py                     # tinygptv-phi2, bf16, ~7.9 GB on disk
    python benchmarks/bench_load_memory.py --preset tinygptv-micro --dir /some/dir --keep

1. A child process builds the preset on the meta device, materialises it in bf16 with random
   values and writes it with ``save_pretrained`` (safetensors, 5 GB shards).
2. A fresh child process loads it with ``from_pretrained`` (meta build, memory-mapped safetensors
   tensors assigned in place) and reports its peak RSS (VmHWM) after the load, then after a forward
   pass over one image and a few tokens, which touches every weight.

Memory-mapped file pages count in RSS once touched, so the figure to compare with the weight bytes
is the peak after the forward pass; a loader that copied the weights would show about twice them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def write(preset: str, directory: Path) -> dict:
    import torch

    from tinygptv import TinyGPTV

    with torch.device("meta"):
        model = TinyGPTV(preset)
    model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 straight away: never an fp32 copy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.02, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    start = time.perf_counter()
    model.save_pretrained(directory)
    return {"write_s": round(time.perf_counter() - start, 1), "write_peak_rss": peak_rss_bytes()}


def load(directory: Path) -> dict:
    import torch

    from tinygptv import TinyGPTV
    from tinygptv.data.encoding import IMAGE_TOKEN_ID

    before = peak_rss_bytes()  # torch + transformers + peft imported, nothing loaded
    start = time.perf_counter()
    model = TinyGPTV.from_pretrained(directory)
    load_s = time.perf_counter() - start
    after_load = peak_rss_bytes()
    size = model.config.vision.image_size
    ids = torch.tensor([[IMAGE_TOKEN_ID] * model.num_image_tokens + list(range(10, 18))])
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, size, size)).logits
    return {
        "load_s": round(load_s, 1),
        "forward_s": round(time.perf_counter() - start, 1),
        "finite": bool(torch.isfinite(logits).all()),
        "peak_rss_before_load": before,
        "peak_rss_after_load": after_load,
        "peak_rss_after_forward": peak_rss_bytes(),
        "dtype": str(next(model.parameters()).dtype),
    }


def child(phase: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinygptv-phi2")
    parser.add_argument("--dir", help="where to write the weights (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the written weights")
    parser.add_argument("--phase", choices=("write", "load"), help=argparse.SUPPRESS)
    parser.add_argument("target", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "write":
        print(json.dumps(write(args.preset, Path(args.target))))
        return
    if args.phase == "load":
        print(json.dumps(load(Path(args.target))))
        return

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tinygptv-bench-")) / "model"
    try:
        written = child("write", "--preset", args.preset, str(directory))
        weight_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        loaded = child("load", str(directory))
    finally:
        if not args.keep:
            shutil.rmtree(directory.parent if not args.dir else directory, ignore_errors=True)
    print(
        f"preset {args.preset}: weights on disk {gb(weight_bytes)} ({loaded['dtype']}), written in {written['write_s']} s"
    )
    print(f"process before loading (imports only): peak RSS {gb(loaded['peak_rss_before_load'])}")
    print(f"from_pretrained: {loaded['load_s']} s, peak RSS after load {gb(loaded['peak_rss_after_load'])}")
    print(
        f"after a forward pass ({loaded['forward_s']} s, finite={loaded['finite']}): peak RSS "
        f"{gb(loaded['peak_rss_after_forward'])} = {loaded['peak_rss_after_forward'] / weight_bytes:.2f} x the weights"
    )


if __name__ == "__main__":
    main()
