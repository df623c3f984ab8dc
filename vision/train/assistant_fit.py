"""Fitting a Gemma 4 assistant (`vision.drafters.AssistantDrafter`) to its target's first drafted token.

Each position t of a sequence is one training query, exactly as drafting's first token sees it: the input is
``[embed(x_t); h_{t-1}]`` (the target's embedding and its last hidden state before t), the query sits at position t,
and it attends to the target's store-layer keys before t (for sliding layers, the last `window` of them); the label
is the target's greedy token after t. One target forward and one assistant forward per step cover every position.
Deeper tokens (fed the assistant's own projected state) are not trained here.
"""
from __future__ import annotations

import torch

from mmspec.errors import InvalidInputError
from mmspec.target import text_config


@torch.no_grad()
def assistant_batch(target, sequences: torch.Tensor, start: int) -> dict:
    """The training queries of `sequences` (B, T) from position `start` on: inputs, positions, shared keys, masks
    and labels (the target's greedy next tokens)."""
    from transformers.cache_utils import DynamicCache

    from vision.drafters.assistant import store_layers

    tc = text_config(target)
    out = target(sequences, cache=DynamicCache(), use_cache=True, output_hidden_states=True)
    layers = store_layers(tc)
    kv = {k: (out.cache.layers[i].keys, out.cache.layers[i].values) for k, i in layers.items()}
    x = torch.cat([target.get_input_embeddings()(sequences[:, 1:]), out.hidden_states[-1][:, :-1]], dim=-1)
    n = sequences.shape[1]
    t = torch.arange(1, n, device=sequences.device)[:, None]  # query positions 1..T-1
    keys = torch.arange(n, device=sequences.device)[None, :]
    visible = {"full_attention": keys < t}
    if "sliding_attention" in layers:
        visible["sliding_attention"] = (keys < t) & (t - keys < int(tc.sliding_window))
    dtype = x.dtype
    masks = {k: torch.zeros(v.shape, dtype=dtype, device=x.device).masked_fill_(~v, torch.finfo(dtype).min)
             [None, None].expand(len(sequences), 1, -1, -1) for k, v in visible.items()}
    labels = out.logits[:, 1:].argmax(-1)
    labels[:, : max(0, start - 1)] = -100  # positions before `start` are context only
    return {"x": x, "positions": t.T.expand(len(sequences), -1), "kv": kv, "masks": masks, "labels": labels}


def fit_assistant(assistant, target, sequences: torch.Tensor, start: int, *, steps: int = 100,
                  lr: float = 1e-2) -> list[float]:
    """Fit `assistant` in place on the target's `sequences` (B, T) at positions >= `start`; per-step losses."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps={steps!r}: must be a positive integer")
    if not 1 <= start < sequences.shape[1]:
        raise InvalidInputError(f"start={start}: must lie in 1..{sequences.shape[1] - 1} (the sequences' length - 1)")
    batch = assistant_batch(target, sequences, start)
    a = assistant
    opt = torch.optim.AdamW(a.parameters(), lr=lr)
    a.train()
    losses = []
    for _ in range(steps):
        h = a.model(inputs_embeds=a.pre_projection(batch["x"]), attention_mask=batch["masks"],
                    position_ids=batch["positions"], shared_kv_states=batch["kv"], use_cache=False).last_hidden_state
        logits = a.masked_embedding(h, a.lm_head.weight) if a.config.use_ordered_embeddings else a.lm_head(h)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    a.eval()
    return losses
