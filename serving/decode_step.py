"""A lean decode step for Llama-family models: the engine's per-step fixed cost (issue 13).

At one row a decode step's arithmetic is a few milliseconds, and transformers' forward spends about
as much again outside it: ~20 module calls a layer, its mask builder, its attention dispatcher and
the rotary table per layer. This runs the same layers as one flat loop over the model's own modules
(their weights, plain or quantized by ``serving.quantize``, are the ones transformers would use):
the rotary table and the mask once a step, the key/value cache (``serving.kv_cache``) written in
place, and attention by ``scaled_dot_product_attention`` over the cache's grouped heads. It
computes what transformers computes, op for op where the order matters (RMSNorm in float32, the
rotation, the residuals), so the served tokens are the same. Only decode steps (one token a row)
take it; prefills keep transformers' forward, where the fixed cost is small beside the arithmetic.

``lean_decoder(model)`` is None for a model it does not cover (another architecture, a scaled
rotary, biased or differently activated layers): that model decodes through transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.kv_cache import BatchKVCache

COVERED_ARCHITECTURES = ("LlamaForCausalLM",)


class LeanDecoder:
    """One decode step of a covered model over a ``BatchKVCache``: ``step(tokens, positions, pads)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq
        self.attention_scaling = rotary.attention_scaling

    def _rms_norm(self, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's own sequence: float32 statistics, back to the input's dtype, then the weight
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.weight * hidden.to(dtype)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, pads: torch.Tensor,
             cache: BatchKVCache) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of the next token after ``tokens`` ``[rows, 1]`` at ``positions``
        ``[rows, 1]``; each row's first ``pads[row]`` cache columns are padding (masked out)."""
        hidden = self.embed(tokens)
        rows = hidden.shape[0]
        dtype = hidden.dtype
        freqs = positions[..., None].float() * self.inv_freq.to(torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(dtype).unsqueeze(1)  # [rows, 1, 1, head_dim]
        sin = (angles.sin() * self.attention_scaling).to(dtype).unsqueeze(1)
        length = cache.length + 1
        mask = None
        if bool(pads.any()):
            mask = (torch.arange(length, device=pads.device).unsqueeze(0) >= pads.unsqueeze(1))[:, None, None, :]
        half = self.head_dim // 2
        grouped = self.kv_heads != self.heads
        for layer, cache_layer in zip(self.layers, cache.layers):
            attention = layer.self_attn
            residual = hidden
            hidden = self._rms_norm(layer.input_layernorm, hidden)
            query = attention.q_proj(hidden).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            key = attention.k_proj(hidden).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            value = attention.v_proj(hidden).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            query = query * cos + torch.cat((-query[..., half:], query[..., :half]), dim=-1) * sin
            key = key * cos + torch.cat((-key[..., half:], key[..., :half]), dim=-1) * sin
            keys, values = cache_layer.update(key, value)
            if mask is None:
                attended = F.scaled_dot_product_attention(query, keys, values, scale=self.scaling, enable_gqa=grouped)
            else:  # one query token: a key/value head's group of query heads as its query rows (transformers' pack_gqa)
                attended = F.scaled_dot_product_attention(query.reshape(rows, self.kv_heads, -1, self.head_dim), keys,
                                                          values, attn_mask=mask, scale=self.scaling)
            hidden = residual + attention.o_proj(attended.reshape(rows, 1, -1))
            residual = hidden
            hidden = self._rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = residual + mlp.down_proj(F.silu(mlp.gate_proj(hidden)) * mlp.up_proj(hidden))
        return self.lm_head(self._rms_norm(self.norm, hidden))[:, -1]


def lean_decoder(model: torch.nn.Module) -> LeanDecoder | None:
    """The lean decode step for ``model``, or None where it would not compute what transformers does."""
    config = model.config
    if type(model).__name__ not in COVERED_ARCHITECTURES:
        return None
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return None
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    return LeanDecoder(model)
