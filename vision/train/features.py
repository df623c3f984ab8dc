"""Training examples for feature drafters: the target's features and next-token choices along each conversation.

EAGLE (Li et al. 2024) trains the head by teacher forcing on the target's own top-layer features: for a
conversation x_0..x_{T-1} with target features f_0..f_{T-1} (the last hidden state, the input of the LM head) the head
reads the pairs (x_{t+1}, f_t) and learns to predict f_{t+1} and the target's next token at t+1. An `Example` holds
what that needs for one record, computed once by one forward of the target over the whole conversation (the
processor's inputs included, so image positions carry the features the target really computes there):

    input_ids       (T,)    the rendered conversation (chat template, add_generation_prompt=False), images expanded
    features        (T, H)  f_t, in the target's dtype (EAGLE-3 taps: (T, k*H), the tapped layers concatenated)
    topk_ids        (T, k)  the target's k most likely next tokens at t (column 0 is the greedy one)
    topk_logprobs   (T, k)  their log-probabilities (not the full distribution: memory stays O(T k), not O(T V))
    answer_start    int     first position of the final assistant answer
    attention       (T,)    the last prompt token's last-layer attention to every position, summed over heads (what
                            DREAM's pruning ranks image tokens by at inference)
    last_hidden     (T, H)  with taps only: the last hidden state, the regression target
    mid_features    (T, H)  DREAM only: the hidden state entering the layer whose attention at t has minimum entropy
                            among the first 40% of layers (`vision.attention_probe`)

Loss weights: every position is trained (image and prompt positions teach the head what the target's features
look like and fill the head's own KV cache the answer positions attend to), but positions inside the answer,
where the drafter actually drafts at inference, weigh 1 and the others `context_weight` (`collate`). The answer
starts where the conversation rendered up to the generation prompt ends (their common prefix, if a template makes
the two differ). The answer is re-tokenised from its text, which may split it differently from the ids the target
generated (and a template may add a space after the generation prompt): EAGLE's data has the same property.

Two sources with one interface (``len``, ``[i] -> Example``): `OnlineFeatures` runs the target when an example is
asked for (SpecVLM-style online distillation, no stored corpus); `precompute` writes the examples once to a cache
directory of safetensors shards (tensors only, ragged with ``cu_seqlens`` offsets) plus ``index.json`` and returns a
`FeatureStore` that reads them back bit for bit, so both modes train on identical numbers.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from mmspec.errors import DatasetError
from mmspec.target import select_hidden
from vision.attention_probe import AttentionProbe, decoder_layers, query_entropy
from vision.drafters.eagle import compressed_view, target_identity
from vision.images import load_images
from vision.prompts import has_chat_template, normalise_messages, process, render, take_message_images
from vision.target import VLMRequest

from .data import Record

INDEX_FILE, FORMAT, VERSION = "index.json", "mmspec.eagle-features", 2
OPTIONAL = ("attention", "last_hidden", "mid_features", "positions")  # Example fields stored when present


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) long
    features: torch.Tensor  # (T, H)
    topk_ids: torch.Tensor  # (T, k) long
    topk_logprobs: torch.Tensor  # (T, k) float32
    answer_start: int
    attention: torch.Tensor | None = None  # (T,) float32
    last_hidden: torch.Tensor | None = None  # (T, H), with taps
    mid_features: torch.Tensor | None = None  # (T, H), DREAM
    positions: torch.Tensor | None = None  # (T, 3) the target's M-RoPE position ids (heads numbering pairs as it
    # does: an EAGLE-3 head of a Qwen-VL target); None: token t at position t

    @property
    def regression_target(self) -> torch.Tensor:
        return self.last_hidden if self.last_hidden is not None else self.features


# ----------------------------------------------------------------------------------------- one record -> example
def encode(processor, record: Record) -> tuple[VLMRequest, int]:
    """(the processed full conversation, the position where the final answer starts)."""
    if not has_chat_template(processor):
        raise DatasetError("the processor has no chat template; training conversations are rendered with it (set "
                           "processor.chat_template)")
    msgs, ordered = take_message_images(normalise_messages(record.messages), list(record.images))
    pil = load_images(ordered)
    n_prompt_images = sum(p["type"] == "image" for m in msgs[:-1] for p in m["content"])
    full = process(processor, render(processor, msgs, add_generation_prompt=False), pil)
    prompt = process(processor, render(processor, msgs[:-1], add_generation_prompt=True), pil[:n_prompt_images])
    start = 0  # the prompt is a prefix of the conversation; if a template breaks that, the common prefix
    for a, b in zip(full.input_ids, prompt.input_ids):
        if a != b:
            break
        start += 1
    return full, start


@torch.no_grad()
def target_outputs(target, request: VLMRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (T, H), logits (T, V)) of one native forward with every processor input."""
    out = target_pass(target, request)
    return out["last_hidden"], out["logits"]


EARLY_FRACTION = 0.4  # DREAM: the intermediate feature comes from the first 40% of the layers


@torch.no_grad()
def target_pass(target, request: VLMRequest, *, taps=None, mid_features: bool = False,
                query_row: int | None = None, positions: bool = False) -> dict:
    """One native forward with every processor input: {"logits" (T, V), "last_hidden" (T, H), "features" (the taps
    concatenated, or the last hidden state), "attention" (T,) row `query_row`'s last-layer attention (None without
    query_row), "mid_features" (T, H) or None}."""
    device = target.get_output_embeddings().weight.device
    ids = torch.tensor([request.input_ids], device=device)
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in request.inputs.items()}
    n_layers = len(decoder_layers(target)) if (mid_features or query_row is not None) else 0
    early = list(range(max(1, math.ceil(EARLY_FRACTION * n_layers)))) if mid_features else []
    layers = early + ([n_layers - 1] if query_row is not None else [])
    reducers = [query_entropy] * len(early) + ([lambda w: w[:, :, query_row].sum(1)] if query_row is not None else [])
    with AttentionProbe(target, layers, reducers) if layers else contextlib.nullcontext() as probe:
        out = target(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, output_hidden_states=True)
    hs = out.hidden_states
    result = {"logits": out.logits[0], "last_hidden": hs[-1][0],
              "features": select_hidden(hs, tuple(taps))[0] if taps else hs[-1][0], "attention": None,
              "mid_features": None, "positions": mrope_positions(target, ids, inputs) if positions else None}
    if query_row is not None:
        result["attention"] = probe.records[-1][0][0].float()  # (T,)
    if mid_features:
        entropy = torch.stack([probe.records[i][0][0] for i in range(len(early))])  # (layers, T)
        best = entropy.argmin(0)  # (T,) the layer each token attends most sharply in
        stacked = torch.stack([hs[i][0] for i in early])  # (layers, T, H): the inputs of those layers
        result["mid_features"] = stacked[best, torch.arange(stacked.shape[1], device=stacked.device)]
    return result


def mrope_positions(target, ids: torch.Tensor, inputs: dict) -> torch.Tensor | None:
    """(T, 3) the M-RoPE position ids the target gives a prompt (its own get_rope_index), None without M-RoPE."""
    from vision.target import rope_index_fn

    rope_index = rope_index_fn(target)
    if rope_index is None:
        return None
    params = inspect.signature(rope_index).parameters
    pos, _ = rope_index(ids, attention_mask=torch.ones_like(ids),
                        **{k: v for k, v in inputs.items() if k in params and torch.is_tensor(v)})
    return pos[:, 0].T.contiguous()


def make_example(target, processor, record: Record, topk: int = 8, *, taps=None,
                 mid_features: bool = False, positions: bool = False) -> Example:
    """taps: hidden-state indices an EAGLE-3 head reads (features become those layers concatenated, the last hidden
    state is kept as the regression target); mid_features: also DREAM's entropy-selected intermediate feature."""
    request, start = encode(processor, record)
    out = target_pass(target, request, taps=taps, mid_features=mid_features, query_row=max(0, start - 1),
                      positions=positions)
    logprobs, ids = torch.log_softmax(out["logits"].float(), dim=-1).topk(topk, dim=-1)  # (T, k) each
    cpu = {k: (v.detach().cpu() if v is not None else None) for k, v in out.items()}
    return Example(torch.tensor(request.input_ids), cpu["features"], ids.cpu(), logprobs.cpu(), start,
                   attention=cpu["attention"], last_hidden=cpu["last_hidden"] if taps else None,
                   mid_features=cpu["mid_features"], positions=cpu["positions"])


class OnlineFeatures:
    """Examples computed by the target when asked for (online mode: nothing is stored)."""

    def __init__(self, target, processor, records: Sequence[Record], topk: int = 8, *, taps=None,
                 mid_features: bool = False, positions: bool = False):
        self.target, self.processor, self.records, self.topk = target, processor, list(records), topk
        self.options = {"taps": tuple(taps) if taps else None, "mid_features": bool(mid_features),
                        "positions": bool(positions)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        return make_example(self.target, self.processor, self.records[i], self.topk, **self.options)


# ------------------------------------------------------------------------------------------------- offline cache
def fingerprint(target, records: Sequence[Record], topk: int, options: dict | None = None) -> str:
    """What the cached numbers depend on: the records (messages, image paths and sizes), k and the target (its
    identity, name, dtype and a checksum of every parameter, so another checkpoint of one architecture differs)."""
    h = hashlib.sha256()
    probe = [float(p.detach().sum(dtype=torch.float64)) for p in target.parameters()]
    h.update(json.dumps([target_identity(target), str(getattr(target.config, "_name_or_path", "")), probe, topk,
                         str(next(target.parameters()).dtype), options or {}]).encode())
    for r in records:
        imgs = [(str(p), os.path.getsize(p)) for p in r.images]
        h.update(json.dumps([imgs, r.messages], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


class FeatureStore:
    """Examples read back from a cache directory written by `precompute` (one shard in memory at a time)."""

    def __init__(self, directory):
        self.root = Path(directory)
        self.index = _read_index(self.root)
        self.starts = []  # first example index of each shard
        n = 0
        for shard in self.index["shards"]:
            self.starts.append(n)
            n += int(shard["examples"])
        self.n = n
        self._loaded: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} of a feature cache with {self.n}")
        s = bisect.bisect_right(self.starts, i) - 1
        t = self._shard(s)
        j = i - self.starts[s]
        a, b = int(t["cu_seqlens"][j]), int(t["cu_seqlens"][j + 1])
        extra = {k: t[k][a:b] for k in OPTIONAL if k in t}
        return Example(t["input_ids"][a:b].long(), t["features"][a:b], t["topk_ids"][a:b].long(),
                       t["topk_logprobs"][a:b], int(t["answer_start"][j]), **extra)

    def _shard(self, s: int) -> dict:
        if self._loaded is None or self._loaded[0] != s:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            path = self.root / self.index["shards"][s]["file"]
            try:
                self._loaded = (s, load_file(str(path)))
            except (SafetensorError, OSError, ValueError) as e:
                raise DatasetError(f"feature shard {str(path)!r} is unreadable ({e}); delete the cache directory "
                                   f"{str(self.root)!r} to recompute it") from e
        return self._loaded[1]


def _read_index(root: Path) -> dict:
    path = root / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{str(path)!r} is missing or not JSON ({e}); not a feature cache written by "
                           "precompute") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DatasetError(f"{str(path)!r} is not a version-{VERSION} {FORMAT} index; delete it to recompute")
    return index


def precompute(target, processor, records: Sequence[Record], cache_dir, *, topk: int = 8, shard_size: int = 256,
               progress: bool = True, taps=None, mid_features: bool = False,
               positions: bool = False) -> FeatureStore:
    """Compute every example once and store it (offline mode); a cache made for the same records, target and k is
    reused as is. Shards are written first and the index last, so an interrupted run is recomputed, never half read."""
    from tqdm.auto import tqdm

    if not records:
        raise DatasetError("no records to compute features for")
    root = Path(cache_dir)
    options = {"taps": list(taps) if taps else None, "mid_features": bool(mid_features)}
    if positions:  # (recorded only when asked, so earlier caches keep their fingerprint)
        options["positions"] = True
    key = fingerprint(target, records, topk, options)
    if (root / INDEX_FILE).is_file():
        try:
            store = FeatureStore(root)
            if store.index.get("fingerprint") == key and all((root / s["file"]).is_file()
                                                             for s in store.index["shards"]):
                return store
        except DatasetError:
            pass  # a stale or broken cache: recomputed below
    root.mkdir(parents=True, exist_ok=True)
    shards, buffer, hidden = [], [], 0
    for i in tqdm(range(len(records)), desc="target features", disable=not progress):
        buffer.append(make_example(target, processor, records[i], topk, taps=taps, mid_features=mid_features,
                                   positions=positions))
        hidden = buffer[-1].features.shape[-1]
        if len(buffer) == shard_size or i == len(records) - 1:
            shards.append(_write_shard(root, len(shards), buffer))
            buffer = []
    index = {"format": FORMAT, "version": VERSION, "fingerprint": key, "topk": topk, "hidden_size": hidden,
             "examples": len(records), "shards": shards}
    tmp = root / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / INDEX_FILE)
    return FeatureStore(root)


def _write_shard(root: Path, n: int, examples: list[Example]) -> dict:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(e.input_ids) for e in examples])
    tensors = {
        "input_ids": torch.cat([e.input_ids for e in examples]).to(torch.int32),  # (N,) over all examples
        "features": torch.cat([e.features for e in examples]).contiguous(),  # (N, H)
        "topk_ids": torch.cat([e.topk_ids for e in examples]).to(torch.int32),  # (N, k)
        "topk_logprobs": torch.cat([e.topk_logprobs for e in examples]).contiguous(),  # (N, k)
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),  # (n + 1,)
        "answer_start": torch.tensor([e.answer_start for e in examples]),  # (n,)
    }
    for k in OPTIONAL:  # (N,) attention, (N, H) last_hidden / mid_features, when the examples have them
        if getattr(examples[0], k) is not None:
            tensors[k] = torch.cat([getattr(e, k) for e in examples]).contiguous()
    name = f"shard-{n:05d}.safetensors"
    save_file(tensors, str(root / name))
    return {"file": name, "examples": len(examples)}


# ------------------------------------------------------------------------------------------------------ batching
@dataclass
class Batch:
    """Training pairs of B examples, right-padded to the longest (padding has weight 0; causal attention never
    lets a real position see it). Pair j of a row is (input_ids[j + 1], features[j]) -> position j + 1."""

    input_ids: torch.Tensor  # (B, L) x_{t+1}
    features: torch.Tensor  # (B, L, F) f_t (F = H, or k*H for EAGLE-3 taps)
    target_features: torch.Tensor  # (B, L, H) f_{t+1}
    topk_ids: torch.Tensor  # (B, L, k) the target's next tokens at t+1
    topk_logprobs: torch.Tensor  # (B, L, k)
    weights: torch.Tensor  # (B, L) 1 inside the answer, context_weight before it, 0 on padding
    answer: torch.Tensor  # (B, L) bool: inside the answer
    mid_features: torch.Tensor | None = None  # (B, L, H) DREAM's intermediate target at t+1
    positions: torch.Tensor | None = None  # (B, L, 3) M-RoPE position ids of f_t's token (Example.positions)

    def to(self, device) -> "Batch":
        return Batch(*(None if getattr(self, f) is None else getattr(self, f).to(device)
                       for f in self.__dataclass_fields__))


def example_pairs(e: Example, context_weight: float) -> dict:
    """One example's training pairs (m = T - 1 of them) as a dict of tensors, before padding."""
    m = len(e.input_ids) - 1
    answer = torch.arange(1, m + 1) >= e.answer_start  # (m,) positions 1..T-1
    return {"input_ids": e.input_ids[1:], "features": e.features[:-1],
            "target_features": e.regression_target[1:], "topk_ids": e.topk_ids[1:],
            "topk_logprobs": e.topk_logprobs[1:], "answer": answer,
            "weights": torch.where(answer, 1.0, context_weight),
            "mid_features": e.mid_features[1:] if e.mid_features is not None else None,
            "attention": e.attention[1:] if e.attention is not None else None,
            "positions": e.positions[:-1] if e.positions is not None else None}


def compress_pairs(pairs: dict, compressor, image_token_id: int, to_head=None) -> dict:
    """The drafter's compressed view of one example's pairs, as at inference (`compressed_view`): compressed image
    slots carry no target (weight 0) and serve as context; text pairs keep theirs. to_head: maps the stored
    features to the head's width first (EAGLE-3's tap_fc). Differentiable in the compressor and to_head."""
    feats = to_head(pairs["features"]) if to_head is not None else pairs["features"]
    tokens, feats, source, _ = compressed_view(pairs["input_ids"].tolist(), feats, compressor, image_token_id,
                                               pairs["attention"])
    keep = source.clamp_min(0)  # gather index; compressed slots are overwritten by zero weights below
    out = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in pairs.items() if k not in ("features", "attention")}
    out.update(input_ids=torch.tensor(tokens), features=feats, attention=None)
    out["weights"] = torch.where(source >= 0, out["weights"], 0.0)
    out["answer"] = out["answer"] & (source >= 0)
    return out


def collate(examples: Sequence[Example], context_weight: float = 0.1, view=None) -> Batch:
    """Pad the examples' pairs into a Batch; view: a function of one example's pairs dict (e.g. `compress_pairs`)."""
    rows = [example_pairs(e, context_weight) for e in examples]
    if view is not None:
        rows = [view(r) for r in rows]

    def pad(key):
        return None if rows[0][key] is None else pad_sequence([r[key] for r in rows], batch_first=True)

    return Batch(pad("input_ids"), pad("features"), pad("target_features"), pad("topk_ids"), pad("topk_logprobs"),
                 pad("weights"), pad("answer"), pad("mid_features"), pad("positions"))
