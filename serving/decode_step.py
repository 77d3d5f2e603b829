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
rotary, biased or differently activated layers): that model decodes through transformers. It is
made once per model (fusing a quantized model's weights takes ~0.5 s), by ``Engine.swap``'s caller
for a hot-swapped version, so the engine thread does not stall on it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from serving.kv_cache import BatchKVCache
from serving.quantize import fused_quantized

COVERED_ARCHITECTURES = ("LlamaForCausalLM",)


class LeanDecoder:
    """One decode step of a covered model over a ``BatchKVCache``: ``step(tokens, positions, pads)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        inner = model.model  # (no reference to ``model`` itself: ``lean_decoder``'s cache holds it weakly)
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.norm_shape = (config.hidden_size,)
        # quantized q/k/v and gate/up as one kernel call each, for the calls their layers would quantize
        self.fused = [(fused_quantized([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                       fused_quantized([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in self.layers]
        self.fused_rows = max((layer.mlp.up_proj.max_rows for layer in self.layers
                               if hasattr(layer.mlp.up_proj, "max_rows")), default=0)
        self.qk_v_sizes = ((self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim)
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq
        self.attention_scaling = rotary.attention_scaling

    def _rms_norm(self, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's float32 statistics, back to the input's dtype, then the weight; torch's fused
        # rms_norm gives its five ops' result bit for bit (the tests compare logits exactly)
        return norm.weight * torch.rms_norm(hidden.to(torch.float32), self.norm_shape, None, self.eps).to(hidden.dtype)

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
        use_fused = rows <= self.fused_rows
        for layer, cache_layer, (qkv, gate_up) in zip(self.layers, cache.layers, self.fused):
            attention, mlp = layer.self_attn, layer.mlp
            residual = hidden
            hidden = self._rms_norm(layer.input_layernorm, hidden)
            if use_fused and qkv is not None:
                query_key, value = qkv(hidden).split(self.qk_v_sizes, dim=-1)
            else:
                query_key = torch.cat((attention.q_proj(hidden), attention.k_proj(hidden)), dim=-1)
                value = attention.v_proj(hidden)
            # the queries' and keys' heads rotated together (the same elementwise ops, half the calls)
            query_key = query_key.view(rows, 1, self.heads + self.kv_heads, self.head_dim).transpose(1, 2)
            query_key = query_key * cos + torch.cat((-query_key[..., half:], query_key[..., :half]), dim=-1) * sin
            query, key = query_key.split((self.heads, self.kv_heads), dim=1)
            value = value.view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache_layer.update(key, value)
            if mask is None:
                attended = F.scaled_dot_product_attention(query, keys, values, scale=self.scaling, enable_gqa=grouped)
            else:  # one query token: a key/value head's group of query heads as its query rows (transformers' pack_gqa)
                attended = F.scaled_dot_product_attention(query.reshape(rows, self.kv_heads, -1, self.head_dim), keys,
                                                          values, attn_mask=mask, scale=self.scaling)
            hidden = residual + attention.o_proj(attended.reshape(rows, 1, -1))
            residual = hidden
            hidden = self._rms_norm(layer.post_attention_layernorm, hidden)
            if use_fused and gate_up is not None:
                gate, up = gate_up(hidden).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(hidden), mlp.up_proj(hidden)
            hidden = residual + mlp.down_proj(F.silu(gate) * up)
        return self.lm_head(self._rms_norm(self.norm, hidden))[:, -1]


_decoders: "weakref.WeakKeyDictionary[torch.nn.Module, LeanDecoder | None]" = weakref.WeakKeyDictionary()


def lean_decoder(model: torch.nn.Module) -> LeanDecoder | None:
    """The lean decode step for ``model`` (made once, kept while the model lives), or None where it
    would not compute what transformers does."""
    if model not in _decoders:
        _decoders[model] = _make_decoder(model)
    return _decoders[model]


def _make_decoder(model: torch.nn.Module) -> LeanDecoder | None:
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
