"""The frozen BLIP-2 Q-Former and its 32 learned query tokens.

transformers' ``Blip2QFormerModel`` is BLIP-2's BERT-base Q-Former (cross-attention into the image
features every second layer). The query tokens are not part of it, so we own them here. The
Q-Former's text side (word/position embeddings, text FFN, LM head) is never used by TinyGPT-V, so
we build it without (``use_qformer_text_input=False``): ~105M parameters instead of ~162M.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import QFormerConfig


def hf_qformer_config(cfg: QFormerConfig, encoder_hidden_size: int, initializer_range: float = 0.02):
    return Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        layer_norm_eps=cfg.layer_norm_eps,
        use_qformer_text_input=False,
        initializer_range=initializer_range,
    )


class QFormer(nn.Module):
    """Image features (N, P, width) -> query outputs (N, num_query_tokens, qformer width)."""

    def __init__(self, cfg: QFormerConfig, encoder_hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=initializer_range)
        self.model = Blip2QFormerModel(hf_qformer_config(cfg, encoder_hidden_size, initializer_range))

    def forward(self, image_features: torch.Tensor, output_cross_attentions: bool = False):
        """Query outputs (N, Q, D); with ``output_cross_attentions``, also each cross-attention layer's
        weights over the image features, (N, heads, Q, P) per layer (needs the ``eager`` attention:
        ``self.model.set_attn_implementation("eager")``)."""
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)  # (N, Q, D)
        image_mask = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        out = self.model(
            query_embeds=queries,
            encoder_hidden_states=image_features,
            encoder_attention_mask=image_mask,
            output_attentions=output_cross_attentions,
        )
        if not output_cross_attentions:
            return out.last_hidden_state  # (N, Q, D)
        if not out.cross_attentions:
            raise RuntimeError(
                f"the Q-Former's {self.model.config._attn_implementation!r} attention returns no weights; "
                "call qformer.model.set_attn_implementation('eager') first"
            )
        return out.last_hidden_state, tuple(out.cross_attentions)
