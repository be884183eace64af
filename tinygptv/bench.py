"""Inference speed and memory of a preset at real size with random weights (``tinygptv bench``).

Speed and memory do not depend on weight values, so each precision runs in its own child process
(its own peak RSS) on a model materialised with random values one layer at a time; quantized modes
quantize each decoder layer as soon as it exists, so the peak is the final model plus one layer.
Measured per precision: image-encode time, TTFT (encode + prefill of the image's 32 tokens + N text
tokens), decode tokens/s of our KV-cached loop, and peak RSS (of a process that holds only that
model). In the same run: the baseline, plain transformers ``generate`` with ``inputs_embeds`` on the
bf16 model (in a child process, so it does not inflate the peak), and the memory-bandwidth limit:
measured read bandwidth / bytes of LM weights read per decoded token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fp32", "bf16", "int8", "int4")


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def materialise(preset: str, mode: str):
    """The preset with LoRA merged away, random weights, in ``mode``; built layer by layer."""
    import gc

    import torch
    from torch import nn

    from tinygptv import TinyGPTV
    from tinygptv.config import get_preset
    from tinygptv.model.weights import rebuild_buffers
    from tinygptv.quantize import quantize_linear_layers

    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    config = get_preset(preset).replace(**{"lora.enabled": False})
    with torch.device("meta"):
        model = TinyGPTV(config)
    lm = model.lm
    quantized = mode in ("int8", "int4")
    layers = list(lm.model.layers)
    units = [model.vision, model.qformer, model.vision_proj, model.lm_proj, lm.model.embed_tokens, *layers]
    units += [m for n, m in lm.model.named_children() if n not in ("layers", "embed_tokens")]
    units.append(lm.lm_head)
    g = torch.Generator().manual_seed(0)
    for unit in units:
        unit.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in unit.named_parameters():
                if p.ndim > 1 or "embedding" in name or "query_tokens" in name:
                    p.normal_(0, 0.02, generator=g)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
        unit.to(dtype)
        if quantized and (unit in layers or unit is lm.lm_head):
            if unit is lm.lm_head:
                quantize_linear_layers(lm, ["lm_head"], mode)
            else:
                names = [n for n, m in unit.named_modules() if isinstance(m, nn.Linear)]
                quantize_linear_layers(unit, names, mode)
        gc.collect()
    rebuild_buffers(model, "cpu")
    return model.eval()


def lm_bytes_per_token(model) -> int:
    """Bytes of language-model weights read to decode one token (the embedding table is indexed, not read)."""
    lm = model.lm
    total = 0
    for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
        if "embed_tokens" in name or "rotary" in name or "inv_freq" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def read_bandwidth_gbs() -> float:
    import torch

    x = torch.ones(512 * 1024 * 1024, dtype=torch.bfloat16)  # 1 GiB
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 2 / best / 1e9


def measure(preset: str, mode: str, new_tokens: int = 32, text_tokens: int = 40, baseline: bool = False) -> dict:
    """Build ``preset`` in ``mode`` in this process and time it; with ``baseline`` also time
    transformers' ``generate`` on the same model."""
    import torch

    from tinygptv.data.encoding import IMAGE_TOKEN_ID
    from tinygptv.generate import SamplingParams, new_cache, stream_tokens

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = materialise(preset, mode)
    build_s = time.perf_counter() - t0
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, dtype=dtype)
    q = model.num_image_tokens
    ids = torch.randint(10, model.config.language.vocab_size - 10, (1, 1 + q + text_tokens))
    ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
    result = {"mode": mode, "build_s": round(build_s, 1)}
    with torch.inference_mode():
        model.encode_images(pixels)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            image_embeds = model.encode_images(pixels)
            times.append(time.perf_counter() - t)
        result["encode_s"] = round(min(times), 3)
        embeds = model.embed(ids, image_embeds)
        params = SamplingParams(max_new_tokens=1)
        list(stream_tokens(model.lm, embeds, new_cache(model.lm), params, []))  # warm-up
        t = time.perf_counter()
        list(stream_tokens(model.lm, embeds, new_cache(model.lm), params, []))
        prefill = time.perf_counter() - t
        result["prefill_s"] = round(prefill, 3)
        result["ttft_s"] = round(prefill + result["encode_s"], 3)
        t = time.perf_counter()
        n = len(list(stream_tokens(model.lm, embeds, new_cache(model.lm), SamplingParams(max_new_tokens=new_tokens), [])))
        total = time.perf_counter() - t
        result["decode_tok_s"] = round((n - 1) / (total - prefill), 2)
        if baseline:
            mask = torch.ones(ids.shape, dtype=torch.long)

            def hf(k):
                t = time.perf_counter()
                model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, pad_token_id=0)
                return time.perf_counter() - t

            hf(2)
            t1, tn = hf(1), hf(new_tokens)
            result["baseline_decode_tok_s"] = round((new_tokens - 1) / (tn - t1), 2)
            result["baseline_ttft_s"] = round(t1 + result["encode_s"], 3)
    result["lm_gb_per_token"] = round(lm_bytes_per_token(model) / 1e9, 3)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return result


def run_baseline(preset: str, new_tokens: int, text_tokens: int, threads: int | None) -> dict:
    """The bf16 model with transformers' ``generate``, measured in a child process."""
    code = "import json, torch; from tinygptv.bench import measure; "
    if threads:
        code += f"torch.set_num_threads({threads}); "
    code += f"print(json.dumps(measure({preset!r}, 'bf16', {new_tokens}, {text_tokens}, baseline=True)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the bf16 baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(preset: str, quantize: str | None, new_tokens: int = 32, text_tokens: int = 40, threads: int | None = None) -> dict:
    """One precision (``quantize`` None = bf16) measured in this process, plus the baseline and
    the bandwidth limit; the JSON object ``tinygptv bench --json`` prints."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    mode = quantize or "bf16"  # "fp32" runs everything in float32
    base = run_baseline(preset, new_tokens, text_tokens, threads)
    bandwidth = read_bandwidth_gbs()
    row = measure(preset, mode, new_tokens, text_tokens)
    return {
        "preset": preset,
        "quantize": quantize,
        "dtype": "float32" if mode == "fp32" else "bfloat16",
        "threads": torch.get_num_threads(),
        "encode_s": row["encode_s"],
        "prefill_s": row["prefill_s"],
        "ttft_s": row["ttft_s"],
        "decode_tok_s": row["decode_tok_s"],
        "peak_rss_gb": row["peak_rss_gb"],
        "baseline_decode_tok_s": base["baseline_decode_tok_s"],
        "baseline_ttft_s": base["baseline_ttft_s"],
        "baseline_peak_rss_gb": base["peak_rss_gb"],
        "bandwidth_gbs": round(bandwidth, 1),
        "lm_gb_per_token": row["lm_gb_per_token"],
        "limit_decode_tok_s": round(bandwidth / row["lm_gb_per_token"], 1),
        "speedup_vs_baseline": round(row["decode_tok_s"] / base["baseline_decode_tok_s"], 2),
    }
