"""Peak memory of a stage-4 training step at real TinyGPT-V size (Phi-2), on the CPU or a GPU.

    python benchmarks/bench_train_memory.py [--image-size 448] [--text-tokens 256 1024] [--steps 2] [--device cuda]

The paper says TinyGPT-V trains on one 24 GB RTX 3090. This script builds the real-size model with
random weights through the trainer's own ``setup`` (frozen parts in bf16, trainable parts in fp32,
the language model's activations checkpointed), runs ``train_step`` on batches of one 448 px image
and N text tokens, and samples the process's resident memory every few milliseconds. The second
step is the steady state (the first one also allocates AdamW's moments).

With ``--device cuda`` it measures the GPU's peak directly. From the CPU figures it estimates a GPU's: the bytes the step holds on top of the process's
libraries, plus a CUDA context. The CPU runs attention without a fused kernel, so its activation
peak is an upper bound of a GPU's with a memory-efficient one.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import psutil
import torch

GB = 1024**3
CUDA_CONTEXT_GB = 0.8  # CUDA context + cuBLAS workspace of a recent PyTorch build (typical; measured 0.5-1 GB)


class PeakRSS:
    """The highest resident set size seen while the ``with`` block runs (sampled every 5 ms)."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class FixedBatches:
    """A data stream that repeats one batch: one image and ``text_tokens`` supervised text tokens."""

    def __init__(self, model, text_tokens: int, batch_size: int):
        from tinygptv.data.encoding import IGNORE_INDEX, IMAGE_TOKEN_ID

        q, size = model.num_image_tokens, model.config.vision.image_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, 1000, (batch_size, 1 + q + text_tokens), generator=g)
        ids[:, 1 : 1 + q] = IMAGE_TOKEN_ID
        labels = ids.clone()
        labels[:, : 1 + q] = IGNORE_INDEX
        self.batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
        }

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--text-tokens", type=int, nargs="+", default=[256, 1024], help="text tokens per sample")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="steps per text length; the last is reported")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation (for comparison)")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="cuda: run the step on the GPU and report its measured peak (torch.cuda.max_memory_allocated)",
    )  # fmt: skip
    args = parser.parse_args()
    cuda = args.device == "cuda"

    from tinygptv.train import setup, train_step
    from tinygptv.train_config import load_train_config

    baseline = psutil.Process().memory_info().rss  # Python, torch, transformers: host-side on a GPU too
    out_dir = tempfile.mkdtemp(prefix="bench-train-")
    config = load_train_config(
        None,
        [
            "stage=4", "model=tinygptv-phi2", "model_overrides={tokenizer: null}", f"image_size={args.image_size}",
            f"batch_size={args.batch_size}", "precision=bf16", f"gradient_checkpointing={not args.no_checkpointing}",
            f"out_dir={out_dir}", "tensorboard=false", "progress=false", "epochs=1", "iters_per_epoch=1000",
            "schedule.warmup_steps=10", "schedule.peak_lr=1e-5", "schedule.min_lr=8e-6", f"device={args.device}",
        ],
    )  # fmt: skip
    start = time.perf_counter()
    with PeakRSS() as build:
        run = setup(config, init_device=args.device)  # random weights drawn on the GPU: seconds, not a minute
    built = psutil.Process().memory_info().rss
    params = list(run.module.parameters())
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    print(
        f"model: {config.model} stage 4, {args.image_size} px, batch {args.batch_size}, bf16 frozen + fp32 trainable, "
        f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}, {torch.get_num_threads()} threads"
    )
    if cuda:
        print(f"  GPU: {torch.cuda.get_device_name()}; weights and optimizer on it: {torch.cuda.memory_allocated() / GB:.2f} GB")
    else:
        print(
            f"  CPU bf16 matmul hardware (AMX / AVX512-BF16): {'yes' if cpu_has_bf16() else 'no: bf16 is emulated, step times are slow'}"
        )
    print(f"  built in {time.perf_counter() - start:.0f} s, peak while building {build.peak / GB:.2f} GB RSS")
    print(
        f"  frozen weights {frozen / GB:.2f} GB; trainable {trainable / 1e6:.1f} M parameters = "
        f"{trainable * 4 / GB:.2f} GB fp32 (+ same for gradients, 2x for AdamW moments)"
    )
    print(f"  process: {baseline / GB:.2f} GB before the model, {built / GB:.2f} GB with it")

    for text_tokens in args.text_tokens:
        run.stream = run.batches = FixedBatches(run.module, text_tokens, args.batch_size)
        for step in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with PeakRSS() as peak:
                result = train_step(run)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if cuda:
            allocated, reserved = torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB
            seq = 1 + run.module.num_image_tokens + text_tokens
            print(f"\n  {text_tokens} text tokens ({seq} with the image's): step {seconds:.2f} s, loss {result.loss:.3f}")
            print(
                f"    measured on the GPU: peak allocated {allocated:.2f} GB, reserved by the caching allocator "
                f"{reserved:.2f} GB (+ CUDA context) -> {'fits' if reserved + CUDA_CONTEXT_GB < 24 else 'does NOT fit'} "
                f"a 24 GB GPU"
            )
            continue
        held = peak.peak - baseline  # model, optimizer state, gradients, activations
        gpu = held / GB + CUDA_CONTEXT_GB
        seq = 1 + run.module.num_image_tokens + text_tokens
        print(f"\n  {text_tokens} text tokens ({seq} with the image's): step {seconds:.1f} s, loss {result.loss:.3f}")
        print(f"    peak RSS during the step {peak.peak / GB:.2f} GB; above the libraries {held / GB:.2f} GB")
        print(
            f"    estimate for a GPU: {held / GB:.2f} GB of tensors + ~{CUDA_CONTEXT_GB} GB CUDA context = "
            f"{gpu:.1f} GB -> {'fits' if gpu < 24 else 'does NOT fit'} a 24 GB GPU ({24 - gpu:+.1f} GB headroom)"
        )
    run.log.close()


if __name__ == "__main__":
    main()
