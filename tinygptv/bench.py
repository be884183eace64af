"""Inference speed and memory of a preset at real size with random weights (``tinygptv bench``).

Speed and memory do not depend on weight values, so each precision runs in its own child process
(its own peak RSS) on a model materialised with random values one piece at a time (a decoder layer,
a ViT block, ...); quantized modes quantize each piece as soon as it exists, so the peak is the final
model plus one piece. The quantized modes run as ``load_model(quantize=...)`` sets them up on a CPU:
float32 activations, the LM's Linear layers int8 / int4 (:mod:`tinygptv.quantize`; int4 keeps
the first decoder layers and the LM head int8) packed for their CPU kernels, the token embedding
table in bf16, the vision encoder and Q-Former int8 dynamic. Measured per precision: image-encode
time, TTFT (encode + prefill of the image's 32 tokens + N text tokens), decode tokens/s of our
KV-cached loop, and peak RSS (of a process that holds only that model, load included). In the same
run: the baseline, plain transformers ``generate`` with ``inputs_embeds`` on the bf16 model (in a
child process, so it does not inflate the peak), and the memory-bandwidth limit: measured read
bandwidth / bytes of LM weights read per decoded token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fp32", "bf16", "int8", "int4")
_PIECE_PARAMS = 64_000_000  # modules larger than this are materialised child by child


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _pieces(module, prefix=""):
    """(name, module, recurse) pieces covering ``module``: small modules whole, large ones as their own
    direct tensors plus their children's pieces."""
    size = sum(p.numel() for p in module.parameters())
    if size <= _PIECE_PARAMS or not list(module.children()):
        return [(prefix, module, True)]
    pieces = [(prefix, module, False)]
    for name, child in module.named_children():
        pieces += _pieces(child, f"{prefix}.{name}" if prefix else name)
    return pieces


def fill_random_(name: str, tensor, generator) -> None:
    """The benchmarks' random weights, in place: N(0, 0.02) for matrices, embeddings and query
    tokens, 1 for (norm) weights, 0 for biases."""
    if tensor.ndim > 1 or "embedding" in name or "query_tokens" in name:
        tensor.normal_(0, 0.02, generator=generator)
    elif name.endswith("weight"):
        tensor.fill_(1.0)
    else:
        tensor.zero_()


def materialise(preset: str, mode: str):
    """The preset with LoRA merged away, random weights, set up for ``mode``; built piece by piece."""
    import torch

    from tinygptv import TinyGPTV
    from tinygptv.config import get_preset
    from tinygptv.model.weights import rebuild_buffers
    from tinygptv.quantize import (
        INT4_INT8_SHARE,
        int8_linear_names,
        language_model_linear_names,
        pack_for_cpu,
        quantize_dynamic_linears,
        quantize_linear_layers,
        release_freed_memory,
        store_token_embedding_in_bf16,
    )

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    quantized = mode in ("int8", "int4")
    config = get_preset(preset).replace(**{"lora.enabled": False})
    with torch.device("meta"):
        model = TinyGPTV(config)
    lm_linears = set(language_model_linear_names(model.lm))
    int8_linears = int8_linear_names(lm_linears, INT4_INT8_SHARE)  # as apply_quantization on a CPU
    g = torch.Generator().manual_seed(0)
    # Largest first: a piece's float transient (the LM head: 0.5 GB in fp32) then comes when the
    # rest of the model is not there yet, so the peak stays near the final size.
    pieces = sorted(_pieces(model), key=lambda piece: -sum(p.numel() for p in piece[1].parameters(recurse=piece[2])))
    for i in range(len(pieces)):
        (name, piece, recurse), pieces[i] = pieces[i], None  # hold no float module once it is replaced
        piece.to_empty(device="cpu", recurse=recurse)
        for module in piece.modules() if recurse else [piece]:
            for bname, b in module._buffers.items():  # computed ones (rotary, position ids): see rebuild_buffers
                if b is not None:
                    module._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device="meta")
        with torch.no_grad():
            for pname, p in piece.named_parameters(recurse=recurse):
                fill_random_(pname, p, g)
            for p in [*piece.parameters(recurse=recurse), *piece.buffers(recurse=recurse)]:
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
        if quantized and recurse:  # a small preset is one piece (name ""), a large one many
            lm = "language_model"
            if name in ("", lm) or name.startswith(lm + "."):
                inner = name[len(lm) + 1 :]
                names = [n for n in lm_linears if not inner or n == inner or n.startswith(inner + ".")]
                quantize_linear_layers(model.lm, names, mode, int8_names=int8_linears)
                if any(m is model.lm.get_input_embeddings() for m in piece.modules()):
                    store_token_embedding_in_bf16(model.lm)
            if name == "":
                quantize_dynamic_linears(model.vision)
                quantize_dynamic_linears(model.qformer)
            elif name.startswith(("vision.", "qformer.")) or name in ("vision", "qformer"):
                quantize_dynamic_linears(piece)
        del piece
        release_freed_memory()
    if quantized:  # once every piece exists: layers that share an input may be fused across pieces
        pack_for_cpu(model.lm)
    rebuild_buffers(model, "cpu")
    return model.eval()


def lm_bytes_per_token(model) -> int:
    """Bytes of language-model weights read to decode one token (the embedding table is indexed, not read)."""
    from tinygptv.quantize import _WeightOnlyLinear

    lm = model.lm
    total = 0
    for module_name, module in lm.named_modules():
        if isinstance(module, _WeightOnlyLinear):
            total += module.weight_nbytes()
            continue
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or "embed_tokens" in module_name or "rotary" in module_name or "inv_freq" in name:
                continue
            total += t.numel() * t.element_size()
    return total


def read_bandwidth_gbs() -> float:
    """The best read rate of a read-bound kernel: fp32 matrix x vector over 1 GB of distinct 64 MB
    matrices (what decoding does). A plain ``sum`` measures less on this CPU (~11-14 GB/s against
    ~26): it is limited by its reduction, not by memory."""
    import torch

    mats = [torch.ones(4096, 4096) for _ in range(16)]  # 16 x 64 MiB
    v = torch.ones(4096)

    def read():
        for m in mats:
            torch.mv(m, v)

    read()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t)
    return sum(m.numel() * 4 for m in mats) / best / 1e9


def measure(preset: str, mode: str, new_tokens: int = 32, text_tokens: int = 40, baseline: bool = False) -> dict:
    """Build ``preset`` in ``mode`` in this process and time it; with ``baseline`` also time
    transformers' ``generate`` on the same model."""
    import torch

    from tinygptv.data.encoding import IMAGE_TOKEN_ID

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = materialise(preset, mode)
    build_s = time.perf_counter() - t0
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, dtype=dtype)
    q = model.num_image_tokens
    ids = torch.randint(10, model.config.language.vocab_size - 10, (1, 1 + q + text_tokens))
    ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
    result = {"mode": mode, "build_s": round(build_s, 1)}
    with torch.inference_mode():
        runs = 1 if baseline else 3  # the baseline only needs the image's embeddings
        if not baseline:
            model.encode_images(pixels)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            image_embeds = model.encode_images(pixels)
            times.append(time.perf_counter() - t)
        result["encode_s"] = round(min(times), 3)
        embeds = model.embed(ids, image_embeds)
        if baseline:
            result.update(_time_hf_generate(model.lm, embeds, new_tokens, result["encode_s"]))
        else:
            result.update(_time_stream(model.lm, embeds, new_tokens, result["encode_s"]))
    from tinygptv.quantize import _WeightOnlyLinear

    result["quantized_linears"] = sum(isinstance(m, _WeightOnlyLinear) for m in model.lm.modules())
    result["lm_bytes_per_token"] = lm_bytes_per_token(model)
    result["lm_gb_per_token"] = round(result["lm_bytes_per_token"] / 1e9, 3)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return result


def last_token_logits(preset: str, mode: str, text_tokens: int = 40, seed: int = 0):
    """(V,) float32 logits for the last position of one image + ``text_tokens`` random text tokens,
    on the random-weight ``preset`` in ``mode`` (the same weights and inputs in every mode): what
    the quality gate of ``benchmarks/bench_quantize_quality.py`` compares across precisions."""
    import torch

    from tinygptv.data.encoding import IMAGE_TOKEN_ID

    model = materialise(preset, mode)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=g).to(dtype)
    q = model.num_image_tokens
    ids = torch.randint(10, model.config.language.vocab_size - 10, (1, 1 + q + text_tokens), generator=g)
    ids[0, 1 : 1 + q] = IMAGE_TOKEN_ID
    with torch.inference_mode():
        embeds = model.embed(ids, model.encode_images(pixels))
        return model.lm(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()


def _time_stream(lm, embeds, new_tokens: int, encode_s: float) -> dict:
    """Prefill and decode speed of our KV-cached loop (:func:`tinygptv.generate.stream_tokens`)."""
    from tinygptv.generate import SamplingParams, new_cache, stream_tokens

    # Warm-up, prefill and two decode steps: packs quantized weights, and on a GPU loads the kernels of
    # both shapes (a first call of a CUDA kernel loads its module: seconds, which would count as decode).
    list(stream_tokens(lm, embeds, new_cache(lm), SamplingParams(max_new_tokens=3), []))
    # One stream, timed at its first token (the prefill and the first sampling; the token's id is read
    # on the host, so a GPU has finished) and at its last: the decode rate is that of the tokens after
    # the first. (Subtracting a prefill timed in a call of its own made short decodes on a busy
    # machine come out negative.)
    stream = stream_tokens(lm, embeds, new_cache(lm), SamplingParams(max_new_tokens=new_tokens), [])
    t = time.perf_counter()
    next(stream)
    first = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    end = time.perf_counter()
    prefill = first - t
    return {"prefill_s": round(prefill, 3), "ttft_s": round(prefill + encode_s, 3),
            "decode_tok_s": round((n - 1) / (end - first), 2) if n > 1 else 0.0}


def _time_hf_generate(lm, embeds, new_tokens: int, encode_s: float) -> dict:
    """The same through transformers' ``generate(inputs_embeds=...)``: the baseline."""
    import torch

    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def hf(k):
        t = time.perf_counter()
        lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                    pad_token_id=0)
        return time.perf_counter() - t

    hf(2)  # warm-up
    t1, tn = hf(1), hf(new_tokens)
    return {"baseline_decode_tok_s": round((new_tokens - 1) / (tn - t1), 2), "baseline_ttft_s": round(t1 + encode_s, 3)}


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
    the bandwidth limit; the JSON object ``tinygptv bench --json`` prints. Quantized modes run with
    float32 activations (what ``load_model`` sets up on a CPU)."""
    import torch

    from tinygptv.quantize import int4_cpu_kernel

    if threads:
        torch.set_num_threads(threads)
    mode = quantize or "bf16"  # "fp32" runs everything in float32
    base = run_baseline(preset, new_tokens, text_tokens, threads)
    row = measure(preset, mode, new_tokens, text_tokens)  # records its peak RSS before the probe below
    bandwidth = read_bandwidth_gbs()
    return {
        "preset": preset,
        "quantize": quantize,
        "dtype": "bfloat16" if mode == "bf16" else "float32",
        "int4_kernel": int4_cpu_kernel() if mode == "int4" else None,
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
        "quantized_linears": row["quantized_linears"],
        "limit_decode_tok_s": round(bandwidth * 1e9 / row["lm_bytes_per_token"], 1),
        "speedup_vs_baseline": round(row["decode_tok_s"] / base["baseline_decode_tok_s"], 2),
    }
