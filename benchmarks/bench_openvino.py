"""OpenVINO's weight-compressed kernels against ours, for the language model at real size on this CPU.

    pip install -e '.[openvino]'
    python benchmarks/bench_openvino.py                    # tinygptv-phi2's LM, int8 and int4, 2 threads
    python benchmarks/bench_openvino.py --modes int4 --keep DIR

For each mode, in processes of their own: the random-weight ``tinygptv-phi2`` language model
(TinyGPT-V's norms included) exported to OpenVINO with NNCF weight compression
(:func:`tinygptv.openvino_lm.export_language_model`; int8 per channel, int4 asymmetric in groups of
64 as ours), then loaded from its IR and timed; and in the same run our own path (``--quantize``:
fbgemm int8, torch's int4 kernel with the first 3/16 of the layers int8), timed the same way
(:func:`tinygptv.generate.stream_tokens`, our KV cache). Both get the same prompt length (one image's
32 tokens + 40 text tokens + BOS: 73) and decode 32 greedy tokens. Printed: the prefill time, the
decode rate, and OpenVINO's peak RSS (its LM and a bf16 token embedding; ours is measured with the
whole model by ``tinygptv bench``, not here). Weights are random (speed does not depend on their
values); the export needs ~15 GB of memory once (the float LM and OpenVINO's copy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 73


def _float_lm(preset: str):
    import torch

    from tinygptv.bench import fill_random_
    from tinygptv.config import get_preset
    from tinygptv.model.language import build_language_model

    with torch.device("meta"):
        lm = build_language_model(get_preset(preset).language)
    lm.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            fill_random_(name, p, g)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(lm.config)  # its computed buffer, on the CPU
    return lm.eval()


def _prompt(width: int):
    import torch

    return torch.randn(1, PROMPT_TOKENS, width, generator=torch.Generator().manual_seed(1)) * 0.02


def worker_export(preset: str, mode: str, path: str) -> dict:
    from tinygptv.openvino_lm import export_language_model

    t = time.perf_counter()
    export_language_model(_float_lm(preset), path, quantize=mode)
    return {"export_s": round(time.perf_counter() - t, 1)}


def worker_openvino(preset: str, path: str, threads: int, new_tokens: int) -> dict:
    import torch

    from tinygptv.bench import peak_rss_gb
    from tinygptv.config import get_preset
    from tinygptv.openvino_lm import OpenVINOLanguageModel

    cfg = get_preset(preset).language
    embedding = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16)  # as ours holds it
    t = time.perf_counter()
    lm = OpenVINOLanguageModel(path, threads=threads)
    load_s = time.perf_counter() - t
    prompt = _prompt(cfg.hidden_size)

    def run():
        lm.reset()
        t = time.perf_counter()
        logits = lm(prompt)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = lm(embedding(logits.argmax(-1))[:, None].float())
        return first - t, (new_tokens - 1) / (time.perf_counter() - first)

    run()  # warm-up: the first call of each shape compiles its kernels
    prefill, rate = run()
    return {"load_s": round(load_s, 1), "prefill_s": round(prefill, 3), "decode_tok_s": round(rate, 2),
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def worker_ours(preset: str, mode: str, threads: int, new_tokens: int) -> dict:
    import torch

    from tinygptv.bench import _time_stream, materialise

    torch.set_num_threads(threads)
    model = materialise(preset, mode)
    with torch.inference_mode():
        result = _time_stream(model.lm, _prompt(model.config.language.hidden_size), new_tokens, 0.0)
    return {"prefill_s": result["prefill_s"], "decode_tok_s": result["decode_tok_s"]}


def _spawn(*args: str) -> dict:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tinygptv-phi2")
    p.add_argument("--modes", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keep", default=None, help="folder to keep the exported IRs in (default: a temporary one)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "export":
            result = worker_export(args.preset, rest[0], rest[1])
        elif kind == "openvino":
            result = worker_openvino(args.preset, rest[0], args.threads, args.new_tokens)
        else:
            result = worker_ours(args.preset, rest[0], args.threads, args.new_tokens)
        print(json.dumps(result))
        return
    common = ["--preset", args.preset, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        print(f"{args.preset} language model, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, {args.threads} threads")
        print("| mode | kernel | prefill s | decode tok/s | peak RSS GB (LM only) | export s |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes:
            path = str(folder / f"lm_{mode}.xml")
            exported = _spawn("export", mode, path, *common)
            ov = _spawn("openvino", path, *common)
            ours = _spawn("ours", mode, *common)
            print(f"| {mode} | OpenVINO (NNCF) | {ov['prefill_s']} | {ov['decode_tok_s']} | {ov['peak_rss_gb']} | {exported['export_s']} |")
            print(f"| {mode} | ours | {ours['prefill_s']} | {ours['decode_tok_s']} | - | - |", flush=True)


if __name__ == "__main__":
    main()
