"""The CLIP text encoder SD1.x conditions on, built from a transformers `text_encoder/config.json`.

State-dict keys equal those of the SD1.x checkpoint files (`text_model.embeddings....`,
`text_model.encoder.layers.N....`, `text_model.final_layer_norm....`); files written by
transformers >= 5 (no `text_model.` level) load too. No buffers: the causal mask
and the position indices are produced in forward, so the module builds on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.models.common import ConfigBase, Linear, linears

_ACTS = {"quick_gelu": ops.quick_gelu, "gelu": ops.gelu}


@dataclass(frozen=True)
class CLIPTextConfig(ConfigBase):
    """The fields of transformers' CLIPTextConfig the encoder uses; defaults are SD1.5's (CLIP ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # SD1.5's config says 2 (a legacy value): pooling then takes argmax(input_ids)

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (supported: {', '.join(_ACTS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads")


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention of x, plus `residual` when given."""
        B, N, C = x.shape
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj))  # one matmul where the ops can
        q = q.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, N, d]
        k = k.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        o = ops.attention(q, k, v, self.head_dim**-0.5, causal=True)  # [B, heads, N, d]
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C), residual)  # [B, N, heads * d]


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)), residual)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(_ln(self.layer_norm1, x), residual=x)  # x + attention, the add fused where it can be
        return self.mlp(_ln(self.layer_norm2, x), residual=x)


def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # [B, N, D]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older checkpoints (SD1.5's among them) also store `position_ids`, the constant
        # arange(77) that transformers once kept as a persistent buffer. We compute positions in
        # forward, so that one obsolete entry is dropped here instead of failing a strict load.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids [B, N] -> (last_hidden_state [B, N, D], pooler_output [B, D])."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Two on-disk layouts exist: SD1.x files (transformers < 5) nest everything under
        # `text_model.`; transformers >= 5 drops that level in memory and in save_pretrained.
        # Keys without it are moved under it, so both load with strict=True.
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "text_model.")]:
            state_dict[prefix + "text_model." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.text_model
        h = tm.encoder(tm.embeddings(input_ids))
        h = _ln(tm.final_layer_norm, h)  # [B, N, D]
        # The pooled state is the one at the end-of-text token. With the legacy eos_token_id == 2
        # transformers takes argmax(input_ids) (EOT has the largest id in CLIP's vocabulary);
        # otherwise the first position holding eos_token_id. int32 keeps argmax ONNX-friendly.
        ids = input_ids.to(torch.int32)
        if self.config.eos_token_id == 2:
            eot = ids.argmax(dim=-1)
        else:
            eot = (ids == self.config.eos_token_id).to(torch.int32).argmax(dim=-1)
        pooled = h[torch.arange(h.shape[0], device=h.device), eot]  # [B, D]
        return h, pooled
