"""The whole TinyGPT-V model: sizes, stage policy, splicing, loss masking, learning, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import random_pixels
from tinygptv.config import TinyGPTVConfig, get_preset
from tinygptv.data.encoding import IGNORE_INDEX, IMAGE_TOKEN_ID
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.stages import STAGES, apply_stage, trainable_parameter_names

PROMPT = "<Img><ImageHere></Img> what color is the circle?"


# --------------------------------------------------------------------------------------------
# Sizes of the real model, derived from the architecture's shapes (ORIGINAL-NOTES)
# --------------------------------------------------------------------------------------------


def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _ln(d):
    return 2 * d


def expected_counts():
    # EVA-ViT-g at 224 px: patch 14 -> 16x16 patches + cls; 39 blocks of width 1408, MLP 6144.
    w, mlp, layers, patches = 1408, 6144, 39, (224 // 14) ** 2
    embeddings = 3 * 14 * 14 * w + w + w + (patches + 1) * w  # conv weight + bias, cls, positions
    # transformers keeps one fused qkv bias of 3 * w (LAVIS's q_bias and v_bias, zeros for k)
    block = _ln(w) + _linear(w, 3 * w) + _linear(w, w) + _ln(w) + _linear(w, mlp) + _linear(mlp, w)
    vision = embeddings + layers * block + _ln(w)  # + ln_vision

    # Q-Former: BERT-base, 12 layers, cross-attention into 1408-wide features on even layers,
    # query-side FFN only (the text side is unused), plus 32 query tokens of 768.
    d, ffn = 768, 3072
    qformer = _ln(d) + 32 * d
    for i in range(12):
        qformer += 3 * _linear(d, d) + _linear(d, d) + _ln(d)  # self-attention + output
        if i % 2 == 0:
            qformer += _linear(d, d) + 2 * _linear(w, d) + _linear(d, d) + _ln(d)  # cross-attention
        qformer += _linear(d, ffn) + _linear(ffn, d) + _ln(d)

    projection = _linear(768, 4096) + _linear(4096, 2560)

    # Phi-2: 32 parallel blocks of 2560, MLP 10240, vocab 51200, untied LM head with bias.
    h, f, v, n = 2560, 10240, 51200, 32
    phi2 = v * h + n * (_ln(h) + 4 * _linear(h, h) + _linear(h, f) + _linear(f, h)) + _ln(h) + _linear(h, v)
    added_norms = n * (2 * _ln(80) + h)  # QK LayerNorms (head dim 80) + post-attention RMSNorm weight
    norms = n * _ln(h) + n * 2 * _ln(80) + n * h + _ln(h)  # input LN, QK LN, RMSNorm, final LN
    lora = n * 4 * 64 * (h + h)  # q, k, v, dense: A (64 x 2560) + B (2560 x 64)
    return {
        "vision": vision,
        "qformer": qformer,
        "projection": projection,
        "language_model": phi2 + added_norms,
        "phi2": phi2,
        "stage1": projection + norms,
        "stage2": projection + norms + lora,
    }


def test_real_size_counts_match_the_paper_parts():
    from tinygptv.commands.info import parameter_counts

    exp = expected_counts()
    counts = parameter_counts(get_preset("tinygptv-phi2"))
    for part in ("vision", "qformer", "projection", "language_model"):
        assert counts[part] == exp[part], part
    assert counts["total"] == exp["vision"] + exp["qformer"] + exp["projection"] + exp["language_model"]
    assert counts["trainable"] == {"1": exp["stage1"], "2": exp["stage2"], "3": exp["stage2"], "4": exp["stage2"]}
    # The paper's rounded figures: ViT ~986M, Q-Former ~105M, projections 13.6M, Phi-2 2.78B.
    assert round(exp["vision"] / 1e6) == 986
    assert round(exp["qformer"] / 1e6) == 105
    assert round(exp["projection"] / 1e5) == 136
    assert exp["phi2"] == 2_779_683_840


def test_real_size_model_builds_on_meta_device_without_memory():
    with torch.device("meta"):
        model = TinyGPTV("tinygptv-phi2-448")
    assert all(p.is_meta for p in model.parameters())
    # 448 px: 32x32 patches + cls position embeddings
    assert model.vision.model.embeddings.position_embedding.shape == (1, 1025, 1408)


def test_info_json_cli():
    out = subprocess.run(
        [sys.executable, "-m", "tinygptv", "info", "tinygptv-tiny", "--json"], capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout)
    assert set(data) == {"vision", "qformer", "projection", "language_model", "total", "trainable"}
    model = TinyGPTV("tinygptv-tiny")
    assert data["total"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert data["trainable"]["2"] > data["trainable"]["1"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown preset 'tinygptv-phi3'.*tinygptv-phi2"):
        get_preset("tinygptv-phi3")
    out = subprocess.run([sys.executable, "-m", "tinygptv", "info", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown preset 'nope'" in out.stderr


def test_config_json_round_trip_and_overrides(tmp_path):
    cfg = get_preset("tinygptv-micro").replace(**{"language.qk_norm": False, "lora.r": 8})
    cfg.to_json(tmp_path / "c.json")
    back = TinyGPTVConfig.from_json(tmp_path / "c.json")
    assert back == cfg and back.language.qk_norm is False and back.lora.r == 8
    with pytest.raises(KeyError, match="language.qk_nrom"):
        cfg.replace(**{"language.qk_nrom": True})
    with pytest.raises(ValueError, match="unknown field"):
        TinyGPTVConfig.from_dict({"vision": {"image_sise": 3}})


# --------------------------------------------------------------------------------------------
# Stage policy
# --------------------------------------------------------------------------------------------


def _expected_trainable(model, stage):
    names = set()
    for n, _ in model.named_parameters():
        if n.startswith(("vision_proj.", "lm_proj.")):
            names.add(n)
        elif n.startswith("language_model.") and any(
            k in n for k in ("input_layernorm.", "q_layernorm.", "k_layernorm.", "post_attention_norm.", "final_layernorm.")
        ):
            names.add(n)
        elif ".lora_" in n and stage > 1:
            names.add(n)
    return names


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_trains_exactly_its_parts_and_only_they_get_gradients(stage, tiny_config, tokenizer):
    torch.manual_seed(0)
    model = TinyGPTV(tiny_config, tokenizer=tokenizer)
    expected = _expected_trainable(model, stage)
    assert apply_stage(model, stage) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # LoRA B starts at zero, which would block gradients to A: perturb it so every LoRA param can get one
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    batch = model.prepare([PROMPT], [random_pixels(1, 28)[0]], ["red"])
    model(**batch).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad == expected


def test_stage_policy_follows_the_ablation_switches(tokenizer):
    cfg = get_preset("tinygptv-tiny").replace(train_input_layernorm=False, **{"lora.enabled": False})
    model = TinyGPTV(cfg, tokenizer=tokenizer)
    names = trainable_parameter_names(model, 4)
    assert not any("input_layernorm" in n or "lora_" in n for n in names)
    assert any("q_layernorm" in n for n in names) and "lm_proj.weight" in names


# --------------------------------------------------------------------------------------------
# Splicing, masking, per-sample losses
# --------------------------------------------------------------------------------------------


def test_prepare_places_image_slots_and_masks_everything_but_the_answer(tiny_model, tokenizer):
    batch = tiny_model.prepare([PROMPT], [random_pixels(1, 28)[0]], ["red circle"])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    slots = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    prefix = tokenizer("<Img>", add_special_tokens=True)["input_ids"]
    assert slots == list(range(len(prefix), len(prefix) + tiny_model.num_image_tokens))
    answer = tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert labels[-len(answer):].tolist() == answer
    assert (labels[: -len(answer)] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (1, 3, 28, 28)


def test_image_embeddings_land_in_the_slots(tiny_model):
    batch = tiny_model.prepare([PROMPT, "no image here"], [random_pixels(1, 28)[0], None], padding_side="right")
    image_embeds = tiny_model.encode_images(batch["pixel_values"])
    embeds = tiny_model.embed(batch["input_ids"], image_embeds)
    slots = batch["input_ids"][0] == IMAGE_TOKEN_ID
    assert torch.equal(embeds[0, slots], image_embeds[0])
    text_ids = batch["input_ids"][1]
    assert torch.equal(embeds[1], tiny_model.lm.get_input_embeddings()(text_ids))


def test_batched_per_sample_losses_equal_each_sample_alone(tiny_model):
    prompts = [PROMPT, "<Img><ImageHere></Img> describe this image in two words please", "what is the color of the sky?"]
    images = [random_pixels(1, 28, seed=1)[0], random_pixels(1, 28, seed=2)[0], None]
    answers = ["red", "a blue square on a white background", "blue"]
    with torch.no_grad():
        batch = tiny_model.prepare(prompts, images, answers)
        assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3  # really different lengths
        together = tiny_model(**batch).per_sample_loss
        alone = [tiny_model(**tiny_model.prepare([p], [i], [a])).loss for p, i, a in zip(prompts, images, answers)]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert len({round(x, 4) for x in together.tolist()}) == 3


def test_loss_equals_token_weighted_cross_entropy(tiny_model):
    batch = tiny_model.prepare([PROMPT, PROMPT], list(random_pixels(2, 28)), ["red", "a large green star"])
    with torch.no_grad():
        out = tiny_model(**batch)
    logp = out.logits.log_softmax(-1)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, batch["labels"].shape[1]):
            label = int(batch["labels"][b, t])
            if label != IGNORE_INDEX:
                total -= float(logp[b, t - 1, label])
                count += 1
    assert math.isclose(out.loss.item(), total / count, rel_tol=1e-5)


# --------------------------------------------------------------------------------------------
# Learning: a tiny model overfits one batch under the stage-1 and stage-2 policies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_model_overfits_one_batch(stage, tiny_config, tokenizer):
    torch.manual_seed(0)
    model = TinyGPTV(tiny_config, tokenizer=tokenizer)
    apply_stage(model, stage)
    batch = model.prepare(
        [PROMPT, "<Img><ImageHere></Img> how many objects are there?"],
        list(random_pixels(2, 28, seed=5)),
        ["red", "two"],
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    model.train()
    first = last = None
    for _ in range(300):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert last < 0.1 * first, (first, last)


# --------------------------------------------------------------------------------------------
# Precision: trainable parts stay fp32 while the frozen backbone runs in bf16
# --------------------------------------------------------------------------------------------


def test_mixed_precision_keeps_trainable_fp32(tiny_config, tokenizer):
    torch.manual_seed(0)
    model = TinyGPTV(tiny_config, tokenizer=tokenizer)
    trainable = apply_stage(model, 2)
    model.cast_frozen(torch.bfloat16)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in trainable else torch.bfloat16), n
    batch = model.prepare([PROMPT], [random_pixels(1, 28)[0]], ["red"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.lm_proj.weight.grad is not None and model.lm_proj.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Greedy generation equals a naive argmax loop without a cache
# --------------------------------------------------------------------------------------------


def test_greedy_generation_matches_naive_loop(tiny_model, tokenizer):
    prompts = [PROMPT, "<Img><ImageHere></Img> describe this image"]
    images = list(random_pixels(2, 28, seed=7))
    texts = tiny_model.generate_greedy(prompts, images, max_new_tokens=6)
    for prompt, image, text in zip(prompts, images, texts):
        batch = tiny_model.prepare([prompt], [image])
        ids = batch["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(6):
                logits = tiny_model(ids, torch.ones_like(ids), batch["pixel_values"]).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                generated.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert text == tokenizer.decode(generated, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# Bad input gets a clear error naming the problem
# --------------------------------------------------------------------------------------------


def test_wrong_image_shape_or_channels(tiny_model):
    batch = tiny_model.prepare([PROMPT], [random_pixels(1, 28)[0]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with pytest.raises(ValueError, match="3 colour channels"):
        tiny_model(ids, mask, torch.randn(1, 4, 28, 28))
    with pytest.raises(ValueError, match="takes 28x28 images, got 32x32"):
        tiny_model(ids, mask, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4 dims"):
        tiny_model(ids, mask, torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match="float tensor"):
        tiny_model(ids, mask, torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


def test_placeholder_count_must_match_images(tiny_model):
    with pytest.raises(ValueError, match="sample 0: the prompt has 1 <ImageHere> placeholder.*but 2 image"):
        tiny_model.prepare([PROMPT], [random_pixels(2, 28)])
    with pytest.raises(ValueError, match="sample 1: the prompt has 0 <ImageHere>.*but 1 image"):
        tiny_model.prepare([PROMPT, "no image"], [random_pixels(1, 28)[0], random_pixels(1, 28)[0]])
    batch = tiny_model.prepare([PROMPT], [random_pixels(1, 28)[0]])
    with pytest.raises(ValueError, match="1 image placeholder.*but 2 image"):
        tiny_model(batch["input_ids"], batch["attention_mask"], random_pixels(2, 28))


def test_text_beyond_context_raises_or_warns_when_truncating(tiny_model):
    long_prompt = PROMPT + " red" * 200  # the tiny preset's context is 128 tokens
    with pytest.raises(ValueError, match="longer than the context of 128"):
        tiny_model.prepare([long_prompt], [random_pixels(1, 28)[0]])
    with pytest.warns(UserWarning, match="truncated a sample from .* to 128 tokens"):
        batch = tiny_model.prepare([long_prompt], [random_pixels(1, 28)[0]], truncate=True)
    assert batch["input_ids"].shape[1] == 128
    with pytest.raises(ValueError, match="exceeds the context length 128"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


def test_no_targets_is_an_error_not_a_nan(tiny_model):
    batch = tiny_model.prepare([PROMPT], [random_pixels(1, 28)[0]])
    with pytest.raises(ValueError, match="no target tokens"):
        tiny_model(**batch)


def test_all_stages_known():
    assert [s.number for s in STAGES.values()] == [1, 2, 3, 4]
    assert STAGES[4].image_size == 448 and not STAGES[1].train_lora


def test_qformer_cross_attentions_need_the_eager_attention():
    from tinygptv.config import get_preset
    from tinygptv.model.qformer import QFormer

    cfg = get_preset("tinygptv-tiny").qformer
    qformer = QFormer(cfg, encoder_hidden_size=32).eval()
    features = torch.randn(2, 5, 32)
    qformer.model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="eager"):
        qformer(features, output_cross_attentions=True)
    plain = qformer(features)
    qformer.model.set_attn_implementation("eager")
    out, attentions = qformer(features, output_cross_attentions=True)
    assert torch.allclose(out, plain, atol=1e-5)
    assert len(attentions) >= 1 and attentions[0].shape == (2, cfg.num_heads, cfg.num_query_tokens, 5)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(()), atol=1e-5)
