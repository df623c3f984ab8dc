"""Training examples for feature drafters: the target's features and next-token choices along each conversation.

EAGLE (Li et al. 2024) trains the head by teacher forcing on the target's own top-layer features: for a
conversation x_0..x_{T-1} with target features f_0..f_{T-1} (the last hidden state, the input of the LM head) the head
reads the pairs (x_{t+1}, f_t) and learns to predict f_{t+1} and the target's next token at t+1. An `Example` holds
what that needs for one record, computed once by one forward of the target over the whole conversation (the
processor's inputs included, so image positions carry the features the target really computes there):

    input_ids       (T,)    the rendered conversation (chat template, add_generation_prompt=False), images expanded
    features        (T, H)  f_t, in the target's dtype
    topk_ids        (T, k)  the target's k most likely next tokens at t (column 0 is the greedy one)
    topk_logprobs   (T, k)  their log-probabilities (not the full distribution: memory stays O(T k), not O(T V))
    answer_start    int     first position of the final assistant answer

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
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mmspec.errors import DatasetError
from vision.images import load_images
from vision.prompts import has_chat_template, normalise_messages, process, render, take_message_images
from vision.target import VLMRequest

from .data import Record

INDEX_FILE, FORMAT, VERSION = "index.json", "mmspec.eagle-features", 1


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,) long
    features: torch.Tensor  # (T, H)
    topk_ids: torch.Tensor  # (T, k) long
    topk_logprobs: torch.Tensor  # (T, k) float32
    answer_start: int


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
    device = target.get_output_embeddings().weight.device
    ids = torch.tensor([request.input_ids], device=device)
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in request.inputs.items()}
    out = target(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def make_example(target, processor, record: Record, topk: int = 8) -> Example:
    request, start = encode(processor, record)
    hidden, logits = target_outputs(target, request)
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)  # (T, k) each
    return Example(torch.tensor(request.input_ids), hidden.detach().cpu(), ids.cpu(), logprobs.cpu(), start)


class OnlineFeatures:
    """Examples computed by the target when asked for (online mode: nothing is stored)."""

    def __init__(self, target, processor, records: Sequence[Record], topk: int = 8):
        self.target, self.processor, self.records, self.topk = target, processor, list(records), topk

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        return make_example(self.target, self.processor, self.records[i], self.topk)


# ------------------------------------------------------------------------------------------------- offline cache
def fingerprint(target, records: Sequence[Record], topk: int) -> str:
    """What the cached numbers depend on: the records (messages, image paths and sizes), k and the target (its
    identity, name, dtype and a checksum of every parameter, so another checkpoint of one architecture differs)."""
    from vision.drafters.eagle import target_identity

    h = hashlib.sha256()
    probe = [float(p.detach().sum(dtype=torch.float64)) for p in target.parameters()]
    h.update(json.dumps([target_identity(target), str(getattr(target.config, "_name_or_path", "")), probe, topk,
                         str(next(target.parameters()).dtype)]).encode())
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
        return Example(t["input_ids"][a:b].long(), t["features"][a:b], t["topk_ids"][a:b].long(),
                       t["topk_logprobs"][a:b], int(t["answer_start"][j]))

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
               progress: bool = True) -> FeatureStore:
    """Compute every example once and store it (offline mode); a cache made for the same records, target and k is
    reused as is. Shards are written first and the index last, so an interrupted run is recomputed, never half read."""
    from tqdm.auto import tqdm

    if not records:
        raise DatasetError("no records to compute features for")
    root = Path(cache_dir)
    key = fingerprint(target, records, topk)
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
        buffer.append(make_example(target, processor, records[i], topk))
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
    name = f"shard-{n:05d}.safetensors"
    save_file(tensors, str(root / name))
    return {"file": name, "examples": len(examples)}


# ------------------------------------------------------------------------------------------------------ batching
@dataclass
class Batch:
    """Training pairs of B examples, right-padded to the longest (padding has weight 0; causal attention never
    lets a real position see it). Pair j of a row is (input_ids[j + 1], features[j]) -> position j + 1."""

    input_ids: torch.Tensor  # (B, L) x_{t+1}
    features: torch.Tensor  # (B, L, H) f_t
    target_features: torch.Tensor  # (B, L, H) f_{t+1}
    topk_ids: torch.Tensor  # (B, L, k) the target's next tokens at t+1
    topk_logprobs: torch.Tensor  # (B, L, k)
    weights: torch.Tensor  # (B, L) 1 inside the answer, context_weight before it, 0 on padding
    answer: torch.Tensor  # (B, L) bool: inside the answer

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(examples: Sequence[Example], context_weight: float = 0.1) -> Batch:
    n = max(len(e.input_ids) for e in examples) - 1
    b, h, k = len(examples), examples[0].features.shape[-1], examples[0].topk_ids.shape[-1]
    dtype = examples[0].features.dtype
    out = Batch(torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, h, dtype=dtype),
                torch.zeros(b, n, h, dtype=dtype), torch.zeros(b, n, k, dtype=torch.long),
                torch.zeros(b, n, k), torch.zeros(b, n), torch.zeros(b, n, dtype=torch.bool))
    for r, e in enumerate(examples):
        m = len(e.input_ids) - 1
        out.input_ids[r, :m] = e.input_ids[1:]
        out.features[r, :m] = e.features[:-1]
        out.target_features[r, :m] = e.features[1:]
        out.topk_ids[r, :m] = e.topk_ids[1:]
        out.topk_logprobs[r, :m] = e.topk_logprobs[1:]
        answer = torch.arange(1, m + 1) >= e.answer_start  # (m,) positions 1..T-1
        out.answer[r, :m] = answer
        out.weights[r, :m] = torch.where(answer, 1.0, context_weight)
    return out
