"""Time to make the shapes world: N images (default 10,000) with every annotation, at 224 px.

    python benchmarks/bench_shapes.py                  # 10k samples into a temporary folder
    python benchmarks/bench_shapes.py --n 2000 --image-sizes 224 448 --out /some/dir

Imports (webdataset pulls in torch) are timed apart from generation. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images to make")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--out", help="folder to write (default: a temporary one, removed afterwards)")
    args = parser.parse_args()

    start = time.perf_counter()
    import webdataset  # noqa: F401  (import cost measured apart)

    from tinygptv.data.shapes import make_shapes

    import_seconds = time.perf_counter() - start
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    try:
        start = time.perf_counter()
        info = make_shapes(out, args.n, seed=args.seed, image_sizes=args.image_sizes)
        seconds = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "images": args.n,
                "image_sizes": info.image_sizes,
                "seconds": round(seconds, 2),
                "images_per_second": round(args.n / seconds, 1),
                "import_seconds": round(import_seconds, 2),
                "disk_mb": round(size_mb, 1),
                "questions": sum(v for k, v in info.counts.items() if k.endswith("/questions")),
            }
        )
    )


if __name__ == "__main__":
    main()
