"""A model's own multi-token-prediction (MTP) layers as a drafter (DeepSeek-V3's MTP module, Liu et al. 2024; the
layout Qwen3.5 ships and vLLM / SGLang serve as its native speculator).

An MTP module predicts the token after next from the pair (x_{t+1}, h_t), h_t the target's last (normalised) hidden
state: ``fc([norm_e(embed(x_{t+1})), norm_h(h_t)])`` through one of the target's own full-attention decoder layers,
a final norm and the target's LM head. That is EAGLE's pair convention, so :class:`MtpHead` is driven by
:class:`~vision.drafters.eagle.EagleDrafter` (chains, static and EAGLE-2 dynamic trees, batches): deeper drafts feed
the module's own output back as the next hidden state, as serving engines do with Qwen3.5's single MTP layer.

transformers 5.24 drops Qwen3.5's ``mtp.*`` weights on load (``_keys_to_ignore_on_load_unexpected``), so
:meth:`MtpHead.from_checkpoint` reads them from the target's safetensors files itself (never a pickle), in the layout
the serving engines read: ``mtp.fc``, ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.layers.N.*``
(a decoder layer of the target's class), ``mtp.norm``.

Models whose config has ``num_mtp_layers`` (DeepSeek-V3, GLM-4-MoE, ...) have their MTP layers loaded by
transformers itself (``MtpModel.from_pretrained(target)``: ``enorm``, ``hnorm``, ``eh_proj``, a decoder block);
:class:`MtpModelHead` puts that module in the same head protocol.
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from mmspec.compat import cache_kwargs
from mmspec.errors import CheckpointError, UnsupportedModelError
from mmspec.target import text_config

PREFIX = "mtp."


def text_decoder(target: nn.Module) -> nn.Module:
    """The target's text decoder (the module holding `layers`, `norm` and `rotary_emb`)."""
    for module in target.modules():
        if all(hasattr(module, a) for a in ("layers", "norm", "rotary_emb")) and isinstance(module.layers,
                                                                                           nn.ModuleList):
            return module
    raise UnsupportedModelError(f"{type(target).__name__} has no text decoder with layers / norm / rotary_emb; "
                                "its MTP layers cannot be built")


def positions_and_mask(config, x: torch.Tensor, position_ids, attention_mask, cache):
    """An MTP layer's positions (default: after the cache's) and causal mask (default: built; a per-type dict: its
    full-attention entry), as the drafter's runner passes them or a direct call leaves them out."""
    seen = cache.get_seq_length() if cache is not None else 0
    order = (torch.arange(x.shape[1], device=x.device) + seen).unsqueeze(0)  # slot order (what causality needs)
    if position_ids is None:
        position_ids = order
    if attention_mask is None:  # (from the slot order: M-RoPE position ids repeat over an image)
        attention_mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                                            position_ids=order, **cache_kwargs(create_causal_mask, cache))
    elif isinstance(attention_mask, dict):
        attention_mask = attention_mask["full_attention"]
    return position_ids, attention_mask


class MtpHead(nn.Module):
    """The target's MTP layer(s) in the EAGLE head protocol (see the module docstring). Randomly initialised until
    loaded (`from_checkpoint`); the embedding, LM head and rotary embedding are the target's, shared and frozen."""

    taps = None
    compressor = None
    tap_fc = None
    image_token_id = None
    target_positions = True  # the target's own layer: pair t at the target's position of token t (M-RoPE rows
    # after an image, as the target laid the prompt out: `mmspec.target.PositionMap`)

    def __init__(self, target: nn.Module, layers: int = 1):
        super().__init__()
        tc = text_config(target)
        decoder = text_decoder(target)
        types = list(getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers)
        if "full_attention" not in types:
            raise UnsupportedModelError(f"{type(target).__name__} has no full-attention layer to build MTP layers from")
        layer_cls = type(decoder.layers[types.index("full_attention")])
        norm_cls = type(decoder.norm)
        self.config = copy.deepcopy(tc)
        self.config.num_hidden_layers = layers
        self.config.layer_types = ["full_attention"] * layers
        hidden, eps = tc.hidden_size, tc.rms_norm_eps
        self.pre_fc_norm_embedding = norm_cls(hidden, eps=eps)
        self.pre_fc_norm_hidden = norm_cls(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([layer_cls(self.config, i) for i in range(layers)])
        self.norm = norm_cls(hidden, eps=eps)
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        self._shared = [embed, head, decoder.rotary_emb]  # the target's: kept out of the module tree (not saved)
        ref = head.weight
        self.to(device=ref.device, dtype=ref.dtype)

    def get_output_embeddings(self):
        return self._shared[1]

    @classmethod
    def from_checkpoint(cls, target: nn.Module, path=None) -> "MtpHead":
        """The target's MTP layers from its checkpoint directory (default: where the target was loaded from):
        every ``mtp.*`` tensor of its safetensors files. A checkpoint without them is a CheckpointError."""
        from safetensors import safe_open

        path = Path(path if path is not None else getattr(target.config, "name_or_path", "") or "")
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise CheckpointError(f"drafter='mtp' needs the target's checkpoint directory with safetensors files; "
                                  f"{str(path) or 'the target'!r} has none (load the target from a local directory, "
                                  "or pass the directory)")
        weights = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key.startswith(PREFIX):
                        weights[key[len(PREFIX):]] = sf.get_tensor(key)
        if not weights:
            raise CheckpointError(f"{str(path)!r} holds no MTP weights (no 'mtp.*' tensors in "
                                  f"{', '.join(f.name for f in files)}); this checkpoint was saved without its MTP "
                                  "layers: use another drafter (ngram, an EAGLE head)")
        n = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("layers.")), default=0)
        head = cls(target, layers=n)
        missing, unexpected = head.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"the MTP weights in {str(path)!r} do not match {type(target).__name__}'s MTP "
                                  f"layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return head

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """This head's weights under the checkpoint names (``mtp.*``), as `from_checkpoint` reads them."""
        return {PREFIX + k: v for k, v in self.state_dict().items()}

    def forward(self, input_ids, features, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                output_hidden_states=False, logits_to_keep=0, **_):
        embed, head, rotary = self._shared
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embed(input_ids).to(features.dtype)),
                               self.pre_fc_norm_hidden(features)], dim=-1))
        position_ids, attention_mask = positions_and_mask(self.config, x, position_ids, attention_mask, cache)
        rope = rotary(x, position_ids)
        h = x
        for layer in self.layers[:1]:  # the drafter feeds its own output back: one MTP layer serves every depth
            h = layer(h, position_embeddings=rope, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **cache_kwargs(layer, cache))
        h = self.norm(h)
        logits = head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return SimpleNamespace(logits=logits, hidden_states=(h,))


class MtpModelHead(nn.Module):
    """transformers' `MtpModel` (the MTP layers of a model whose config has ``num_mtp_layers``) in the EAGLE head
    protocol: ``enorm(embed(x_{t+1}))`` and ``hnorm(h_t)`` through ``eh_proj``, the MTP decoder block, the shared
    head. Its first MTP layer serves every depth (the drafter feeds its output back), as for `MtpHead`."""

    taps = None
    compressor = None
    tap_fc = None
    image_token_id = None
    target_positions = True  # the target's own layer: pair t at the target's position of token t (M-RoPE rows
    # after an image, as the target laid the prompt out: `mmspec.target.PositionMap`)

    def __init__(self, mtp_model: nn.Module):
        super().__init__()
        self.mtp = mtp_model
        self.config = mtp_model.config

    @classmethod
    def from_target(cls, target: nn.Module) -> "MtpModelHead":
        """The target's MTP layers as transformers loads them from its checkpoint (`MtpModel.from_pretrained`)."""
        from transformers.modeling_layers import MtpModel

        if getattr(text_config(target), "num_mtp_layers", None) is None:
            raise UnsupportedModelError(f"{type(target).__name__}'s config has no num_mtp_layers: transformers keeps "
                                        "no MTP layers for it (Qwen3.5: drafter='mtp' reads its mtp.* tensors)")
        try:
            return cls(MtpModel.from_pretrained(target))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the MTP layers of {type(target).__name__} could not be loaded from its "
                                  f"checkpoint ({type(e).__name__}: {e})") from e

    def get_output_embeddings(self):
        return self.mtp.shared_head

    def forward(self, input_ids, features, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                output_hidden_states=False, logits_to_keep=0, **_):
        mtp = self.mtp
        x = mtp.embed_tokens(input_ids).to(features.dtype)
        position_ids, attention_mask = positions_and_mask(self.config, x, position_ids, attention_mask, cache)
        rope = mtp.rotary_emb(x, position_ids=position_ids) if mtp.rotary_emb is not None else None
        h = mtp.layers[0](x, features, position_embeddings=rope, attention_mask=attention_mask,
                          position_ids=position_ids, **cache_kwargs(mtp.layers[0], cache))
        if mtp.use_shared_post_norm:
            h = mtp.shared_post_norm(h)
        logits = mtp._project_to_logits(h[:, -logits_to_keep:] if logits_to_keep else h)
        return SimpleNamespace(logits=logits, hidden_states=(h,))
