"""TinyGPT-V: image -> frozen ViT -> frozen Q-Former -> two projections -> spliced into the LM.

Paper section 3.1 and Figure 2; exact shapes in ORIGINAL-NOTES. The image's 32 query outputs
become 32 soft-prompt embeddings that replace the slots of each ``<ImageHere>`` in the text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TinyGPTVConfig, get_preset
from ..data.encoding import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    collate,
    encode_prompt,
)
from .language import build_language_model, lora_target_regex
from .qformer import QFormer
from .vision import VisionEncoder


@dataclass
class TinyGPTVOutput:
    """What :meth:`TinyGPTV.forward` returns."""

    logits: torch.Tensor
    """(B, T, vocab) next-token logits."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over all target tokens of the batch (None without labels)."""
    per_sample_loss: torch.Tensor | None = None
    """(B,) mean cross-entropy over each sample's own target tokens (NaN for a sample with none)."""


class TinyGPTV(nn.Module):
    """The TinyGPT-V model.

    Build a random-weight model from a config or preset name with ``TinyGPTV(config)``; under
    ``with torch.device("meta"):`` nothing is allocated, which is how real-size models are built
    before their weights are loaded.
    """

    def __init__(self, config: TinyGPTVConfig | str, tokenizer=None):
        super().__init__()
        if isinstance(config, str):
            config = get_preset(config)
        self.config = config
        self.tokenizer = tokenizer
        self.feature_cache = None
        """An :class:`~tinygptv.model.feature_cache.ImageFeatureCache` of Q-Former outputs, set by a
        trainer whose images repeat; only valid while the ViT and Q-Former are frozen."""
        init = config.initializer_range
        # 1. frozen vision encoder + ln_vision, frozen Q-Former + query tokens
        self.vision = VisionEncoder(config.vision, init)
        self.qformer = QFormer(config.qformer, config.vision.hidden_size, init)
        # 2. the two trainable projections: Q-Former width -> 4096 (MiniGPT-4's space) -> LM width
        self.vision_proj = nn.Linear(config.qformer.hidden_size, config.projection_hidden_size)
        self.lm_proj = nn.Linear(config.projection_hidden_size, config.language.hidden_size)
        for proj in (self.vision_proj, self.lm_proj):
            nn.init.normal_(proj.weight, std=init)
            nn.init.zeros_(proj.bias)
        # 3. the language model with TinyGPT-V's norms, then LoRA on its attention (peft)
        self.language_model = self._with_lora(build_language_model(config.language, init))
        # 4. a saved quantized model: Linear layers become quantized ones, so its weights load as they are
        if config.quantization.language_model is not None:
            if config.lora.enabled:
                raise ValueError("a quantized model has its LoRA merged: set lora.enabled=False with quantization")
            from ..quantize import quantize_language_model

            quantize_language_model(self, **_quantization_args(config))

    def _with_lora(self, lm: nn.Module) -> nn.Module:
        lora = self.config.lora
        if not lora.enabled:
            return lm
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(self.config.language, lora.target_modules),
            bias="none",
        )
        with warnings.catch_warnings():
            # peft calls a transformers method deprecated in 5.x; the warning is not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(lm, peft_config)

    # --- parts ------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The transformers causal LM itself (with LoRA layers injected, if any)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def device(self) -> torch.device:
        return self.lm_proj.weight.device

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # --- image path -------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` unless ``pixel_values`` is (N, 3, S, S) at the model's size."""
        size = self.config.vision.image_size
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (N, 3, {size}, {size})")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have 4 dims (N, 3, {size}, {size}), got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have 3 colour channels (RGB), got {pixel_values.shape[1]} "
                f"in shape {tuple(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"this model ({self.config.name}) takes {size}x{size} images, got "
                f"{pixel_values.shape[2]}x{pixel_values.shape[3]}; resize with the model's image processor"
            )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, num_query_tokens, LM width) soft prompts."""
        self.check_pixel_values(pixel_values)
        if self.feature_cache is None:
            queries = self.encode_queries(pixel_values)
        else:
            self._check_frozen_encoder()
            queries = self.feature_cache(pixel_values, self.encode_queries)
        proj_dtype = self.vision_proj.weight.dtype
        return self.lm_proj(self.vision_proj(queries.to(proj_dtype)))  # (N, 32, 4096) -> (N, 32, C)

    def encode_queries(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, num_query_tokens, Q-Former width): ViT, then Q-Former."""
        vision_dtype = self.vision.model.embeddings.patch_embedding.weight.dtype
        features = self.vision(pixel_values.to(vision_dtype))  # (N, 1 + P, 1408)
        return self.qformer(features)  # (N, 32, 768)

    def _check_frozen_encoder(self) -> None:
        for part in (self.vision, self.qformer):
            if part.training or any(p.requires_grad for p in part.parameters()):
                raise ValueError(
                    f"the image feature cache needs a frozen encoder, but the {type(part).__name__} "
                    f"{'is in train mode' if part.training else 'has trainable parameters'}"
                )

    # --- text + image splicing --------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image slot (``IMAGE_TOKEN_ID``) replaced, in order, by the image
        soft prompts ``image_embeds`` (N, Q, C). Returns (B, T, C)."""
        slots = input_ids == IMAGE_TOKEN_ID  # (B, T)
        n_slots = int(slots.sum())
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"the prompts hold {n_slots // max(self.num_image_tokens, 1)} image placeholder(s) "
                f"({n_slots} slots) but {n_images} image(s) were given"
            )
        embed_tokens = self.lm.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(slots, 0))  # (B, T, C)
        if n_images:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TinyGPTVOutput:
        """Training / scoring forward.

        ``input_ids`` (B, T) hold ``IMAGE_TOKEN_ID`` slots for the images of ``pixel_values``
        (N, 3, S, S), in order; ``labels`` (B, T) are -100 wherever no loss is wanted (build both
        with :meth:`prepare` or :mod:`tinygptv.data.encoding`).
        """
        max_len = self.config.language.max_position_embeddings
        if input_ids.shape[1] > max_len:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds the context length {max_len} of {self.config.name}"
            )
        # 1. images -> (N, Q, C) soft prompts
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        # 2. text embeddings with the image slots filled -> (B, T, C)
        inputs_embeds = self.embed(input_ids, image_embeds)
        # 3. language model -> (B, T, vocab)
        logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits
        if labels is None:
            return TinyGPTVOutput(logits=logits)
        # 4. next-token loss on target positions only
        loss, per_sample = causal_lm_loss(logits, labels)
        return TinyGPTVOutput(logits=logits, loss=loss, per_sample_loss=per_sample)

    # --- convenience: strings + pixels -> a batch -------------------------------------------
    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[torch.Tensor | None] | None = None,
        answers: Sequence[str] | None = None,
        padding_side: str = "right",
        truncate: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of prompts (with ``<ImageHere>`` placeholders) and optional answers.

        ``images[i]`` is sample i's image(s): a (3, S, S) or (k, 3, S, S) tensor, or None; the
        number of images must equal the number of placeholders in ``prompts[i]``.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass tokenizer= to TinyGPTV or load one")
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(images)} image entries"
                + (f" and {len(answers)} answers" if answers is not None else "")
                + ": one of each per sample"
            )
        encoded, pixels = [], []
        for i, prompt in enumerate(prompts):
            sample_images = _as_image_stack(images[i])
            n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
            n_images = 0 if sample_images is None else sample_images.shape[0]
            if n_placeholders != n_images:
                raise ValueError(
                    f"sample {i}: the prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                    f"but {n_images} image(s) were given"
                )
            if sample_images is not None:
                pixels.append(sample_images)
            answer = answers[i] if answers is not None else None
            encoded.append(
                encode_prompt(
                    self.tokenizer,
                    prompt,
                    answer,
                    self.num_image_tokens,
                    max_length=self.config.language.max_position_embeddings,
                    truncate=truncate,
                )
            )
        batch = collate(encoded, self.pad_token_id, padding_side=padding_side)
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return candidate
        return 0

    # --- batched generation (the single-stream engine lives in tinygptv.chat / tinygptv.generate) --
    @torch.no_grad()
    def generate(
        self,
        images: Sequence | None,
        prompts: Sequence[str],
        template: str | None = "stage4",
        task: str | None = None,
        **sampling,
    ) -> list[str]:
        """Answer a batch at once (left padding, transformers' ``generate``; beams with ``num_beams``).

        ``images[i]`` is sample i's image: a PIL image, path, bytes, a (3, S, S) tensor, or None.
        With a ``template`` (default ``stage4``) each prompt is a question rendered with it (and
        ``task``'s identifier); with ``template=None`` prompts are used as written, ``<ImageHere>``
        placeholders included. ``sampling`` takes :class:`~tinygptv.generate.SamplingParams` fields.
        """
        from ..data.templates import get_template
        from ..generate import SamplingParams, generate_batch

        params = SamplingParams(**sampling)
        images = list(images) if images is not None else [None] * len(prompts)
        pixels = [self._pixels(image) for image in images]
        stops = tuple(params.stop)
        if template is not None:
            tmpl = get_template(template)
            prompts = [tmpl.prompt(p, 0 if px is None else 1, task) for p, px in zip(prompts, pixels)]
            stops += tmpl.stop_strings
        batch = self.prepare(prompts, pixels, padding_side="left")
        image_embeds = self.encode_images(batch["pixel_values"].to(self.device)) if "pixel_values" in batch else None
        inputs_embeds = self.embed(batch["input_ids"].to(self.device), image_embeds)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        params = SamplingParams(**{**params.__dict__, "stop": stops})
        out = generate_batch(
            self.lm, inputs_embeds, batch["attention_mask"].to(self.device), params, eos, self.pad_token_id,
            tokenizer=self.tokenizer,
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [_cut_at_stop(t, stops) for t in texts]

    def generate_greedy(self, prompts, images=None, max_new_tokens: int = 20, stop_strings=()) -> list[str]:
        """Greedy answers to raw prompts (``<ImageHere>`` placeholders included)."""
        return self.generate(images, prompts, template=None, max_new_tokens=max_new_tokens, stop=tuple(stop_strings))

    def _pixels(self, image):
        """One image as a normalised (3, S, S) tensor at this model's resolution (None stays None)."""
        if image is None or torch.is_tensor(image):
            return image
        from ..chat import load_image
        from ..data.image_processing import image_processor_for

        pixels = image_processor_for(self.config.vision.image_size)(load_image(image))
        return pixels.to(self.lm_proj.weight.dtype)

    # --- one-shot and multi-turn use (the engine lives in tinygptv.chat / tinygptv.generate) ----
    def ask(self, image, question: str, task: str | None = None, template: str = "stage4", **sampling):
        """Answer one question about ``image`` (PIL image, path, bytes or None); returns an
        :class:`~tinygptv.chat.Answer` with the text and any boxes, in pixels of ``image``."""
        conversation = self.chat(template)
        if image is not None:
            conversation.add_image(image)
        return conversation.ask(question, task, **sampling)

    def chat(self, template: str = "stage4", **sampling):
        """A new :class:`~tinygptv.chat.Conversation` with this model."""
        from ..chat import Conversation
        from ..generate import SamplingParams

        return Conversation(self, template, SamplingParams(**sampling))

    # --- precision ----------------------------------------------------------------------------
    def cast_frozen(self, dtype: torch.dtype) -> "TinyGPTV":
        """Cast frozen parameters to ``dtype`` (bf16/fp16) and keep trainable ones in fp32.

        TinyGPT-V keeps its norms, projections and LoRA in fp32 while the frozen backbone runs in
        half precision (ORIGINAL-NOTES, "Architecture"). Run the forward under ``torch.autocast``.
        """
        for p in self.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
        return self

    # --- weights: save / load / merge (thin wrappers; name maps and checks in weights.py) ---------
    def save_pretrained(self, directory, trainable_only: bool = False, base=None, max_shard_size="5GB"):
        """Write config.json, safetensors (sharded above ``max_shard_size``) and the tokenizer.

        ``trainable_only`` keeps only what trains (projections, LM norms, LoRA) and records where the
        frozen parts come from (``base``: our format's path / hub id, or ``Ingredients``).
        """
        from ..quantize_bnb import has_bnb_layers
        from .weights import save_pretrained

        if has_bnb_layers(self):
            raise ValueError(
                "this model's language model was quantized by bitsandbytes, which our format does not store: "
                "save the float model (bitsandbytes quantizes while loading), or our int8 / int4 layers with "
                "`tinygptv quantize`"
            )
        if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in self.modules()):
            raise ValueError(
                "this model's vision encoder was quantized dynamically for inference (load_model(quantize=...)); "
                "save the float model, or a quantized one with `tinygptv quantize`"
            )
        return save_pretrained(self, directory, trainable_only=trainable_only, base=base, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id=None,
        device=None,
        dtype=None,
        offline=None,
        revision=None,
        verify=False,
        quantize=None,
        quantize_backend="auto",
    ):
        """Load our format from a local directory or a hub id (memory-mapped; ``load_report`` says
        what came from where); no path: the built-in model. ``quantize``: ``"int8"`` / ``"int4"``
        quantizes the language model's weights after loading (LoRA merged first); a model saved
        quantized loads as it is. ``quantize_backend``: ``"tinygptv"`` (our int8 / int4 layers and
        CPU kernels), ``"bitsandbytes"`` (LLM.int8() / NF4, :mod:`tinygptv.quantize_bnb`) or
        ``"auto"``: bitsandbytes on CUDA for a float model, ours elsewhere."""
        from ..inference import apply_bnb_quantization, apply_quantization, builtin_model_dir, resolve_quant_backend
        from .weights import load_pretrained

        source = builtin_model_dir() if path_or_hub_id is None else path_or_hub_id
        backend = resolve_quant_backend(quantize_backend, device) if quantize is not None else None
        # bitsandbytes quantizes each layer on its way to the device, so the float model loads on the host
        model, report = load_pretrained(source, "cpu" if backend == "bitsandbytes" else device, dtype, offline, revision, verify)
        model.load_report = report
        saved_mode = model.config.quantization.language_model
        if backend == "bitsandbytes" and saved_mode is not None:
            if quantize_backend == "bitsandbytes":
                raise ValueError(
                    f"{source} holds tinygptv {saved_mode} weights; bitsandbytes quantizes float models: "
                    "load this one with quantize_backend='tinygptv', or quantize the float model"
                )
            backend = "tinygptv"
            model.to(device or "cpu")
        if backend == "bitsandbytes":
            apply_bnb_quantization(model, quantize, device or "cpu")
        elif quantize is not None or saved_mode is not None:
            apply_quantization(model, quantize, str(source))
        return model

    @classmethod
    def from_ingredients(cls, config, ingredients, device=None, dtype=torch.float32, offline=None):
        """Assemble from public weights (Phi-2 dir, BLIP-2 / LAVIS files, MiniGPT-4, stage checkpoint).

        ``ingredients`` is a :class:`tinygptv.model.weights.Ingredients`; ``config`` a config or preset name.
        """
        from .weights import load_ingredients

        config = get_preset(config) if isinstance(config, str) else config
        model, report = load_ingredients(config, ingredients, device, dtype, offline)
        model.load_report = report
        return model

    def load_released_checkpoint(self, path, stage=None, sha256=None):
        """Copy the authors' ``TinyGPT-V_for_Stage{N}.pth`` into this (loaded) model; returns the report."""
        from .weights import load_released_checkpoint

        return load_released_checkpoint(self, path, stage, sha256)

    def merge_lora(self) -> "TinyGPTV":
        """Fold LoRA into the base weights for inference; the config then says ``lora.enabled=False``."""
        from .weights import merge_lora

        return merge_lora(self)


def _quantization_args(config: TinyGPTVConfig) -> dict:
    q = config.quantization
    return {"mode": q.language_model, "group_size": q.group_size, "include_lm_head": q.lm_head, "int8_share": q.int8_share}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted cross-entropy over positions whose label is not -100.

    Returns the batch mean over all target tokens and the (B,) per-sample means.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    mask = shift_labels != IGNORE_INDEX
    n_targets = mask.sum()
    if n_targets == 0:
        raise ValueError("the batch has no target tokens (every label is -100): nothing to learn from")
    loss = token_loss.sum() / n_targets
    per_sample = token_loss.sum(dim=1) / mask.sum(dim=1)  # NaN where a sample has no targets
    return loss, per_sample


def _as_image_stack(images: torch.Tensor | None) -> torch.Tensor | None:
    if images is None:
        return None
    if not torch.is_tensor(images):
        raise ValueError(f"images must be tensors (3, S, S) or (k, 3, S, S), got {type(images).__name__}")
    if images.ndim == 3:
        return images.unsqueeze(0)
    if images.ndim == 4:
        return images
    raise ValueError(f"an image must be (3, S, S) or (k, 3, S, S), got shape {tuple(images.shape)}")


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut].strip()


__all__ = ["TinyGPTV", "TinyGPTVOutput", "causal_lm_loss"]
