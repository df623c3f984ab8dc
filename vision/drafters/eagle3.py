"""The EAGLE-3 draft head as serving engines load it (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of
Large Language Models via Training-Time Test"), with a reduced draft vocabulary.

At position t the head reads the pair (token x_{t+1}, target features f_t), f_t being the target's hidden states at
three layers (low, middle, high) concatenated (3H), projected by ``fc`` to H. Its one decoder layer (``midlayer``)
normalises the token's embedding (``input_layernorm``) and the feature (``hidden_norm``) separately and attends over
their concatenation (the q / k / v projections read 2H); the residual stream starts from the feature itself. The
layer's output h (before the final ``norm``) is what the next draft step reads in place of f: EagleDrafter feeds it
back, as for EAGLE-1. Logits come from the head's own ``lm_head`` over a draft vocabulary of N target tokens:

    d2t (N,) int64: target id = draft index + d2t[index];   t2d (V,) bool: target id is in the draft vocabulary,

the convention of EAGLE, vLLM's speculators, SGLang and SpecForge. The head returns logits over the target's
vocabulary with -inf outside the draft vocabulary, so a proposal's q lives on the target's vocabulary and
verification is unchanged (lossless whatever N). The embedding is the target's, shared and frozen.

The weights are named as the EAGLE-3 checkpoints published for SGLang are (``fc``, ``midlayer.*``, ``norm``,
``lm_head``, ``d2t``, ``t2d``); `vision.export` writes and reads the serving layouts.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from mmspec.checkpoint import read_kind_config, read_safetensors, write_checkpoint
from mmspec.compat import cache_kwargs
from mmspec.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from mmspec.target import text_config

from .eagle import check_trained_for, image_token_id_of, target_identity
from .mtp import positions_and_mask


def vocab_maps(draft_ids: torch.Tensor, target_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for a draft vocabulary given as its target ids, ascending (N,)."""
    ids = torch.as_tensor(draft_ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()):
        raise InvalidInputError("a draft vocabulary is a non-empty ascending list of distinct target token ids")
    if int(ids[-1]) >= target_vocab or int(ids[0]) < 0:
        raise InvalidInputError(f"draft vocabulary ids must lie in [0, {target_vocab}) (the target's vocabulary); "
                                f"got ids up to {int(ids[-1])}")
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


def mrope_of(config) -> dict | None:
    """The target's M-RoPE settings ({"mrope_section": [t, h, w], "mrope_interleaved": bool}) or None (1-D RoPE)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if not section:
        return None
    return {"mrope_section": [int(s) for s in section], "mrope_interleaved": bool(params.get("mrope_interleaved"))}


def rope_theta(config) -> float:
    """The target's RoPE base (the head numbers its pairs 1-D, at the target's base frequency)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def text_decoder_rotary(target: nn.Module) -> nn.Module:
    """The target's text decoder's rotary embedding module."""
    from .mtp import text_decoder

    return text_decoder(target).rotary_emb


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over [input_layernorm(embedding); hidden_norm(feature)] (2H wide)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx=0)
        heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn.q_proj = nn.Linear(2 * hidden, heads * dim, bias=bias)
        self.self_attn.k_proj = nn.Linear(2 * hidden, kv * dim, bias=bias)
        self.self_attn.v_proj = nn.Linear(2 * hidden, kv * dim, bias=bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)

    def forward(self, embeds, features, rope, attention_mask, position_ids, cache):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)
        attn, _ = self.self_attn(x, position_embeddings=rope, attention_mask=attention_mask,
                                 position_ids=position_ids, **cache_kwargs(self.self_attn, cache))
        h = features + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """See the module docstring. `taps`: the target's hidden-state indices read (3 of them, low / middle / high);
    `draft_vocab`: the draft vocabulary's target ids (ascending) or an int N for the first N ids until
    `set_draft_vocab` (training chooses them from token frequencies); None = the whole target vocabulary.
    mrope: number the pairs as the target does under M-RoPE (Qwen-VL: the image's 3-D positions, text after it at
    len + delta), through the target's own rotary embedding, as SGLang runs Qwen-VL drafters; None = when the target
    uses M-RoPE. Otherwise pair t sits at position t (1-D RoPE at the target's base)."""

    CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "mmspec.eagle3"
    compressor = None
    image_token_id = None
    w_reg = 0.0  # EAGLE-3 drops EAGLE's feature regression: the head's h is free to be what drafting needs

    def __init__(self, target: nn.Module, taps: tuple[int, ...], draft_vocab: torch.Tensor | int | None = None,
                 mrope: bool | None = None):
        super().__init__()
        if not taps or len(taps) < 2:
            raise InvalidInputError(f"an EAGLE-3 head reads several target layers (taps=(low, mid, high)); got "
                                    f"taps={taps!r}")
        tc = text_config(target)
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        if embed is None or head is None:
            raise UnsupportedModelError(f"{type(target).__name__} exposes no input embeddings / LM head to share")
        n_layers = int(text_config(target).num_hidden_layers)
        resolved = [int(t) if int(t) >= 0 else n_layers + 1 + int(t) for t in taps]
        if len(set(resolved)) != len(resolved) or not all(0 <= t <= n_layers for t in resolved):
            raise InvalidInputError(f"taps={tuple(taps)!r}: distinct hidden-state indices of the target, in "
                                    f"[0, {n_layers}] (negative from the end)")
        self.taps = tuple(sorted(resolved))  # ascending, as serving engines concatenate them
        self.target_identity = target_identity(target)
        self.target_path = str(getattr(getattr(target, "config", None), "name_or_path", "") or "") or None
        self.target_image_token_id = image_token_id_of(getattr(target, "config", None))
        hidden, heads = int(tc.hidden_size), int(tc.num_attention_heads)
        self.target_vocab = int(head.weight.shape[0])
        self.config = LlamaConfig(
            vocab_size=self.target_vocab, hidden_size=hidden,
            intermediate_size=int(getattr(tc, "intermediate_size", 4 * hidden)), num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or hidden // heads),
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 4096)),
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)), tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta(tc)},
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.config._attn_implementation = "sdpa"
        ids = torch.arange(self.target_vocab if draft_vocab is None else draft_vocab) if isinstance(
            draft_vocab, int) or draft_vocab is None else torch.as_tensor(draft_vocab)
        d2t, t2d = vocab_maps(ids, self.target_vocab)
        self.vocab_chosen = not (isinstance(draft_vocab, int) and draft_vocab < self.target_vocab)  # see set_draft_vocab
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)
        self.fc = nn.Linear(len(self.taps) * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(self.config)
        self.norm = LlamaRMSNorm(hidden, eps=self.config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, d2t.numel(), bias=False)
        self.mrope = mrope_of(tc) if mrope is not False else None
        if mrope and self.mrope is None:
            raise UnsupportedModelError(f"{type(target).__name__} does not use M-RoPE: an M-RoPE drafter cannot run "
                                        "on it")
        self.target_positions = self.mrope is not None  # EagleDrafter then feeds the target's position ids
        self.rotary_emb = None if self.mrope else LlamaRotaryEmbedding(self.config)  # M-RoPE: the target's, below
        rotary = text_decoder_rotary(target) if self.mrope else None
        self._shared = [embed, head, rotary]  # the target's: kept out of the module tree (frozen, not saved)
        self.to(device=head.weight.device, dtype=head.weight.dtype)

    # --- what EagleDrafter and the trainer read -----------------------------------------------------------------
    @property
    def tap_fc(self) -> nn.Linear:
        """The projection of the target's taps (3H -> H): EagleDrafter applies it to the target's features."""
        return self.fc

    @property
    def layers(self) -> int:
        return 1

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def draft_ids(self) -> torch.Tensor:
        """The draft vocabulary's target ids (N,), ascending."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, draft_ids) -> None:
        """Choose the draft vocabulary (target ids, ascending, as many as lm_head has rows)."""
        d2t, t2d = vocab_maps(torch.as_tensor(draft_ids).cpu(), self.target_vocab)
        if d2t.numel() != self.draft_vocab_size:
            raise InvalidInputError(f"{d2t.numel()} draft ids for a head with a draft vocabulary of "
                                    f"{self.draft_vocab_size}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        self.vocab_chosen = True

    def get_output_embeddings(self):
        return self._shared[1]  # logits come out over the target's vocabulary

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids, features, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                output_hidden_states=False, logits_to_keep=0, **_):
        embed = self._shared[0]
        if features.shape[-1] != self.config.hidden_size:
            features = self.fc(features)  # the target's taps (k*H); the head's own outputs are already H
        embeds = embed(input_ids).to(features.dtype)
        position_ids, attention_mask = positions_and_mask(self.config, embeds, position_ids, attention_mask, cache)
        rope = self.rope(embeds, position_ids)
        h = self.midlayer(embeds, features, rope, attention_mask, position_ids, cache)
        out = h[:, -logits_to_keep:] if logits_to_keep else h
        return SimpleNamespace(logits=self.target_logits(self.lm_head(self.norm(out))), hidden_states=(h,))

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) (B, L, D) for position ids (B, L), or (3, B, L) under M-RoPE (the target's rotary module)."""
        if self.mrope is None:
            return self.rotary_emb(x, position_ids)
        cos, sin = self._shared[2](x, position_ids)  # the target's: its sections (interleaved or not) combined
        if cos.dim() != 3:
            raise UnsupportedModelError(f"the target's rotary embedding returned cos of shape {tuple(cos.shape)}; an "
                                        "M-RoPE EAGLE-3 head needs the rows combined (B, L, D)")
        return cos, sin

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (..., N) -> target-vocabulary logits (..., V), -inf outside the draft vocabulary."""
        if self.draft_vocab_size == self.target_vocab:
            return draft_logits
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.target_vocab), float("-inf"))
        return full.index_copy(-1, self.draft_ids, draft_logits)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> Path:
        cfg = {"taps": list(self.taps), "draft_vocab_size": self.draft_vocab_size, "target": self.target_identity,
               "target_path": self.target_path, "mrope": self.mrope is not None}
        weights = {k: v for k, v in self.state_dict().items() if not k.startswith("rotary_emb")}
        return write_checkpoint(directory, self.KIND, cfg, weights, config_name=self.CONFIG_NAME,
                                weights_name=self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory, target: nn.Module) -> "Eagle3Head":
        """Load a head saved by `save_pretrained` for `target` (a head made for another target is refused)."""
        cfg = read_kind_config(Path(directory) / cls.CONFIG_NAME, cls.KIND, cls.__name__)
        check_trained_for(directory, cfg, target, "mmspec train-drafter --head eagle3")
        weights = read_safetensors(Path(directory) / cls.WEIGHTS_NAME, "drafter checkpoint")
        return cls.from_weights(target, cfg["taps"], weights, str(directory), mrope=bool(cfg.get("mrope")))

    @classmethod
    def from_weights(cls, target: nn.Module, taps, weights: dict[str, torch.Tensor], source: str,
                     mrope: bool = False) -> "Eagle3Head":
        """A head for `target` from tensors named as `save_pretrained` names them (d2t sets the draft vocabulary)."""
        if "d2t" not in weights:
            raise CheckpointError(f"{source!r} has no 'd2t' tensor (the draft -> target vocabulary map)")
        n = int(weights["d2t"].numel())
        vocab = int(target.get_output_embeddings().weight.shape[0])
        if n > vocab:
            raise CheckpointError(f"{source!r}: its draft vocabulary has {n} entries, more than the target's {vocab}")
        head = cls(target, tuple(taps), draft_vocab=n, mrope=mrope)
        try:
            head.set_draft_vocab(torch.arange(n) + weights["d2t"].long().cpu())
        except InvalidInputError as e:
            raise CheckpointError(f"{source!r}: 'd2t' does not map to distinct target ids below {vocab} ({e})") from e
        missing, unexpected = head.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("rotary_emb")]
        if missing or unexpected:
            raise CheckpointError(f"{source!r} does not match an EAGLE-3 head for {type(target).__name__}: missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}")
        return head.to(device=target.get_output_embeddings().weight.device,
                       dtype=target.get_output_embeddings().weight.dtype)
