"""The policy being trained: a causal LM with LoRA adapters (or fully trainable) and a value head
on the same backbone.

Why one module holds all three roles:

- policy and value share the backbone: one forward gives the logits and V(s_t) (a scalar head on
  the last hidden state), so PPO pays for one backbone pass per minibatch, not two;
- π_ref is the same backbone with the adapters disabled (``reference_logits``): no second copy of
  the model in memory. Full fine-tuning keeps a frozen copy instead;
- logits are computed for the response positions only (the LM head is the largest matmul);
- with adapters on the top layers only, the frozen bottom layers give the same hidden states for
  π, π_ref and every PPO epoch: ``frozen_prefix`` computes them once per rollout and the forwards
  run only the top layers from there (Llama-style bodies; others run whole).

Under a bfloat16 autocast the frozen base weights are stored in bfloat16 (no per-forward casts);
adapters and the value head stay float32 master weights. The LM head and the value head compute in
float32 outside the autocast (``_float32_logits``, ``_values``): a bfloat16 matmul rounds logits of
magnitude 8-16 to steps of 1/16, and which way a logit rounds depends on the batch's shape, so the
rollout's log π_θold and an epoch's log π_θ of identical weights differed by up to ~0.1 nats per
token (half PPO's clip range). A frozen LM head keeps a float32 copy of its weight for that.

On a GPU (``from_pretrained(config, device)``) the model and every tensor of a rollout live on the
device: ``left_pad``, ``generate`` and ``text_batches`` make theirs there, and the tensors PPO
derives from them follow; artifacts are written from host copies.

Artifacts (the serving contract, named in ``flywheel.contracts.artifacts``): format "lora" is
peft's ``save_pretrained`` folder (``adapter_config.json`` + ``adapter_model.safetensors``); format
"full" is ``model.safetensors`` + ``config.json`` of the whole causal LM. Both add
``value_head.safetensors`` so a child run can warm-start its critic.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flywheel.models import autocast_context, autocast_dtype, cache_argument

from flywheel.contracts.artifacts import (FULL_WEIGHTS_FILE, LORA_ADAPTER_FILE, POLICY_FORMAT_FULL, POLICY_FORMAT_LORA,
                                         VALUE_HEAD_FILE)

log = logging.getLogger(__name__)

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA, FULL = "lora", "full"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text (what the held-out hash reads) and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass
class PolicyModelConfig:
    base_model: str
    """Hugging Face causal-LM folder of the initial policy π_ref (version 0)."""
    finetune: str = LORA
    """"lora": train adapters on the frozen base (a version is a few MB); "full": every weight."""
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    """Every linear layer of a Llama-style decoder layer ("all-linear" cannot be combined with
    ``lora_layers``)."""
    lora_layers: int = 8
    """Adapters go on the top ``lora_layers`` decoder layers only (-1 = every layer): the backward
    pass then stops there instead of running through the whole network, which on a CPU is most of
    a PPO update's cost (the same trade as the reward model's ``trainable_layers``)."""
    autocast_dtype: str = "bfloat16"
    """Compute dtype inside forwards; "float32" turns autocast off."""


class PolicyWithValueHead(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, tokenizer, config: PolicyModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        # SmolLM2's pad == eos; padding must be a token that never ends a response.
        self.pad_id = 0 if tokenizer.pad_token_id in (None, self.eos_id) else int(tokenizer.pad_token_id)
        lm.config.use_cache = False
        self.reference_lm: torch.nn.Module | None = None
        if config.finetune == LORA:
            from peft import LoraConfig, get_peft_model

            lm.requires_grad_(False)
            n_layers = int(lm.config.num_hidden_layers)
            top = {} if not 0 < config.lora_layers < n_layers else {
                "layers_to_transform": list(range(n_layers - config.lora_layers, n_layers)), "layers_pattern": "layers"}
            lm = get_peft_model(lm, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                               target_modules=config.lora_target_modules, task_type="CAUSAL_LM", **top))
        elif config.finetune == FULL:
            self.reference_lm = copy.deepcopy(lm).requires_grad_(False).eval()
            lm.requires_grad_(True)
        else:
            raise ValueError(f"finetune must be {LORA!r} or {FULL!r}, got {config.finetune!r}")
        self.lm = lm
        causal_lm = lm.get_base_model() if config.finetune == LORA else lm
        self.body = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.frozen_layers = 0
        """Bottom decoder layers without adapters whose output ``frozen_prefix`` caches (0 = none)."""
        if config.finetune == LORA and all(hasattr(self.body, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")):
            n_layers = len(self.body.layers)
            self.frozen_layers = n_layers - config.lora_layers if 0 < config.lora_layers < n_layers else 0
        hidden = int(causal_lm.config.hidden_size)
        self.value_head = torch.nn.Linear(hidden, 1)
        self.reset_value_head()
        self.register_buffer("lm_head_float32", None, persistent=False)
        self.register_buffer("reference_head_float32", None, persistent=False)
        self._store_frozen_in_compute_dtype()
        self.eval()

    @classmethod
    def from_pretrained(cls, config: PolicyModelConfig, device: torch.device | str = "cpu") -> "PolicyWithValueHead":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32)
        return cls(lm, AutoTokenizer.from_pretrained(config.base_model), config).to(device)

    @property
    def device(self) -> torch.device:
        """Where the policy computes, and where its rollouts' tensors are made."""
        return self.value_head.weight.device

    def reset_value_head(self) -> None:
        """V ≡ 0. A random head adds a random function of the position to every advantage until it
        has learned (and the value clip lets it move 0.2 per iteration): an incentive for or against
        length that has nothing to do with the reward. Zero is also the right value to start from
        when the reward is calibrated (mean 0 over served completions). Not the reward model's
        head: that reads another backbone's (trained) hidden state at the last token, not this
        body's at every position."""
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def _store_frozen_in_compute_dtype(self) -> None:
        dtype = self.compute_dtype
        if dtype is None:
            return
        # the heads compute in float32: a frozen head keeps a float32 copy of its weight (taken before
        # the bfloat16 cast; with tied embeddings the body keeps reading the bfloat16 one)
        reference_head = None if self.reference_lm is None else self.reference_lm.lm_head
        for name, head in (("lm_head_float32", self.lm_head), ("reference_head_float32", reference_head)):
            if _plain_linear(head) and not head.weight.requires_grad:
                setattr(self, name, head.weight.detach().float().clone())
        for module in (self, self.reference_lm):
            if module is None:
                continue
            for parameter in module.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(dtype)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.config.autocast_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.compute_dtype, self.device.type)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- forwards ----
    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                frozen_hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] that predict each of the last T tokens and the values V(s_t) [B, T]
        (the state before each response token), from one backbone pass. ``frozen_hidden`` is
        ``frozen_prefix``'s output for these rows, if already computed."""
        with self.autocast():
            hidden = self._hidden(self.body, query_responses, attention_mask, frozen_hidden)
        hidden = hidden[:, -response_length - 1:-1]
        return self._float32_logits(self.lm_head, hidden), self._values(hidden)

    def critic_values(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                      frozen_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """V(s_t) [B, T] with gradients into the value head only (PPO's critic warm-up): the body runs
        without gradients, so neither the policy nor its backward pass is touched."""
        with torch.no_grad(), self.autocast():
            hidden = self._hidden(self.body, query_responses, attention_mask, frozen_hidden)
        return self._values(hidden[:, -response_length - 1:-1])

    @torch.no_grad()
    def reference_logits(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                         frozen_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """π_ref's logits for the last T tokens: the base with adapters disabled (or the frozen copy)."""
        if self.reference_lm is not None:
            with self.autocast():
                hidden = self._hidden(self.reference_lm.model, query_responses, attention_mask)
            return self._float32_logits(self.reference_lm.lm_head, hidden[:, -response_length - 1:-1])
        with self.lm.disable_adapter(), self.autocast():
            hidden = self._hidden(self.body, query_responses, attention_mask, frozen_hidden)
        return self._float32_logits(self.lm_head, hidden[:, -response_length - 1:-1])

    def _float32_logits(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """z = h·Wᵀ in float32, outside any autocast (why: the module docstring)."""
        if not _plain_linear(head):  # e.g. an adapter on the LM head: its own forward
            with self.autocast():
                return head(hidden).float()
        weight = self.lm_head_float32 if head is self.lm_head else self.reference_head_float32
        weight = head.weight if weight is None else weight
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), weight.float(), None if head.bias is None else head.bias.float())

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) [B, T] from the float32 value head, outside any autocast."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def frozen_prefix(self, query_responses: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The output of the bottom layers that have no adapters (None when there are none)."""
        if not self.frozen_layers:
            return None
        with self.autocast():
            embeddings = self.body.embed_tokens(query_responses)
            return self._run_layers(embeddings, attention_mask, self.body.layers[:self.frozen_layers])

    def _hidden(self, body, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                frozen_hidden: torch.Tensor | None = None) -> torch.Tensor:
        if frozen_hidden is not None and body is self.body and self.frozen_layers:
            return body.norm(self._run_layers(frozen_hidden, attention_mask, body.layers[self.frozen_layers:]))
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask),
                    use_cache=False).last_hidden_state

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        """What the Llama-style body's forward does for a slice of its layers."""
        from transformers.masking_utils import create_causal_mask

        position_ids = _position_ids(attention_mask)
        # the cache argument is positional: transformers 5.23 calls it past_key_values, 5.24 cache
        mask = create_causal_mask(self.body.config, hidden, attention_mask, None, position_ids=position_ids)
        position_embeddings = self.body.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        return hidden

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], response_length: int, temperature: float = 1.0,
                 max_prompt_length: int = 256, generator: torch.Generator | None = None,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one response per prompt in one batched, KV-cached generation.

        Returns (query_responses [B, P + T], attention_mask, responses [B, T], response_mask [B, T]):
        prompts left-padded, responses exactly T columns, padded with ``pad_id`` after their EOS; the
        mask covers each response up to and including its EOS."""
        from transformers import DynamicCache

        input_ids, attention_mask = self.left_pad([p.token_ids[-max_prompt_length:] for p in prompts])
        batch, device = input_ids.shape[0], input_ids.device
        responses = torch.full((batch, response_length), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        cache = DynamicCache()
        position_ids = _position_ids(attention_mask)
        step_ids, step_mask = input_ids, attention_mask
        with self.autocast():
            for t in range(response_length):
                # transformers 5.23 would swallow cache= into its **kwargs and decode without the context
                hidden = self.body(input_ids=step_ids, attention_mask=step_mask, position_ids=position_ids,
                                   use_cache=True, **cache_argument(self.body, cache)).last_hidden_state
                logits = self._float32_logits(self.lm_head, hidden[:, -1])
                if greedy:
                    token = logits.argmax(dim=-1)
                else:
                    probabilities = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
                    token = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
                token = torch.where(finished, torch.full_like(token, self.pad_id), token)
                responses[:, t] = token
                finished |= token == self.eos_id
                if bool(finished.all()):
                    break
                step_ids = token.unsqueeze(-1)
                step_mask = torch.cat([step_mask, torch.ones(batch, 1, dtype=step_mask.dtype, device=device)], dim=1)
                position_ids = position_ids[:, -1:] + 1
        response_mask = response_mask_until_eos(responses, self.eos_id)
        query_responses = torch.cat([input_ids, responses], dim=1)
        full_mask = torch.cat([attention_mask, response_mask.long()], dim=1)
        return query_responses, full_mask, responses, response_mask.float()

    def left_pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences(sequences, self.pad_id, left=True, device=self.device)

    def right_pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences(sequences, self.pad_id, device=self.device)

    # ---- language-model loss on plain text (PPO-ptx, perplexity) ----
    def text_batches(self, texts: Sequence[str], batch_size: int, max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokenized right-padded batches of texts (each cut to ``max_length`` tokens)."""
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
        encoded = [e + [self.eos_id] for e in encoded if e]
        return [self.right_pad(encoded[start:start + batch_size]) for start in range(0, len(encoded), batch_size)]

    def language_model_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            reference: bool = False, reduction: str = "mean") -> torch.Tensor:
        """Next-token negative log-likelihood of the text (mean per token, or the sum with its token
        count for ``reduction="sum"``), under π_θ or π_ref."""
        context = contextlib.nullcontext()
        body, head = self.body, self.lm_head
        if reference:
            if self.reference_lm is not None:
                body, head = self.reference_lm.model, self.reference_lm.lm_head
            else:
                context = self.lm.disable_adapter()
        with context, self.autocast():
            hidden = self._hidden(body, input_ids, attention_mask)
        logits = self._float32_logits(head, hidden[:, :-1])
        targets = input_ids[:, 1:]
        mask = attention_mask[:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
        if reduction == "sum":
            return torch.stack([nll.sum(), mask.sum()])
        return nll.sum() / mask.sum().clamp(min=1)

    # ---- artifacts (safetensors only) ----
    def save(self, folder: Path) -> str:
        """Write this policy's artifacts into ``folder``; returns the format."""
        folder = Path(folder)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.value_head.state_dict().items()},
                  str(folder / VALUE_HEAD_FILE), metadata={"format": "pt"})
        if self.config.finetune == LORA:
            self.lm.save_pretrained(folder, safe_serialization=True)
            readme = folder / "README.md"  # peft's model card: not an artifact
            readme.unlink(missing_ok=True)
            return POLICY_FORMAT_LORA
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lm.state_dict().items()}
        if getattr(self.lm.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(folder / FULL_WEIGHTS_FILE), metadata={"format": "pt"})
        self.lm.config.save_pretrained(folder)
        return POLICY_FORMAT_FULL

    def load_version(self, folder: Path, format: str) -> None:
        """Start from a saved version (a warm start): its adapter or weights, and its value head."""
        folder = Path(folder)
        if format != self.config.finetune:
            raise ValueError(f"cannot load a {format!r} version into a {self.config.finetune!r} policy")
        if format == POLICY_FORMAT_LORA:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, load_file(str(folder / LORA_ADAPTER_FILE)))
        else:
            self.lm.load_state_dict(load_file(str(folder / FULL_WEIGHTS_FILE)), strict=False)
        if (folder / VALUE_HEAD_FILE).exists():
            self.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))

    def reset_adapters(self) -> None:
        """Back to the initial policy (adapters zero, i.e. π = π_ref) and a fresh value head, so a
        worker can keep the base model loaded between runs."""
        if self.config.finetune != LORA:
            raise ValueError("only a LoRA policy can be reset in place")
        from peft.tuners.lora import LoraLayer

        for module in self.lm.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.reset_lora_parameters(name, True)
        self.reset_value_head()

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters() if p.requires_grad)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists padded to one width (right, or left for prompts
    that a generation continues), on ``device`` (the host by default)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            input_ids[row, columns] = torch.tensor(list(sequence))
            attention_mask[row, columns] = 1
    if device is not None:
        return input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


def _plain_linear(module: torch.nn.Module | None) -> bool:
    return type(module) is torch.nn.Linear


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (a left-padded row starts at position 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_mask_until_eos(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row (every sampled token when there is none)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~after_eos
