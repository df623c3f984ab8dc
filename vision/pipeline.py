"""`SpeculativeVLM`: speculative chat for stock transformers VLMs, with the same answer as the target alone.

    svlm = SpeculativeVLM.from_pretrained("path-or-id", drafter="path-or-id" | "ngram" | model | Drafter)
    out = svlm.generate(images=[img], prompt="Describe the image.", max_new_tokens=64)
    out.text, out.token_ids, out.stats
    for piece in svlm.stream(images=[img], prompt="..."): print(piece, end="")
    chat = svlm.chat(); chat.send("What is it?", images=[img]); chat.send("And the colour?")

Drafters (ALGORITHMS.md section 4): a small VLM of the same family that sees the image (its own prefill includes the
pixels, unlike transformers' assisted generation); a text-only LM sharing the tokenizer (images are kept out of it,
only the text is drafted); the n-gram drafter; or any object implementing `mmspec.drafters.Drafter`
(the feature-level drafters of vision.drafters plug in there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mmspec.checkpoint import load_pretrained
from mmspec.checks import check_local_path, check_max_new_tokens, check_sampling, check_seed, check_tree
from mmspec.drafters import ModelDrafter
from mmspec.errors import InvalidInputError, TokenizerMismatchError
from mmspec.loop import NoDrafter, SpeculativeDecoder, check_drafter, ngram_drafter
from mmspec.request import Request
from mmspec.stats import GenerationStats

from .prompts import batch_args, build_request, text_only_ids
from .target import VLMRunner, VLMTarget


@dataclass
class VLMOutput:
    texts: list[str]
    sequences: list[list[int]]  # generated ids per request (prompt excluded)
    finish_reasons: list[str]
    stats: GenerationStats

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def token_ids(self) -> list[int]:
        return self.sequences[0]


def is_vlm(model) -> bool:
    return hasattr(model.config, "vision_config") or hasattr(model, "get_image_features")


def check_same_tokenizer(target_tok, drafter_tok) -> None:
    """The drafter's tokenizer must give the target's ids: same id for every token of the smaller vocabulary."""
    a, b = target_tok.get_vocab(), drafter_tok.get_vocab()
    small, big = (b, a) if len(b) <= len(a) else (a, b)
    for token, idx in small.items():
        if big.get(token) != idx:
            raise TokenizerMismatchError(
                f"the drafter's tokenizer differs from the target's: token {token!r} has id {b.get(token)} in the "
                f"drafter and {a.get(token)} in the target; use a drafter trained with the target's tokenizer, or "
                "drafter='ngram'")
    probe = "Describe the image in detail, 123 times! Ünïcödé?"
    if target_tok(probe, add_special_tokens=False)["input_ids"] != drafter_tok(probe, add_special_tokens=False)[
            "input_ids"]:
        raise TokenizerMismatchError("the drafter's tokenizer splits text differently from the target's; use a "
                                     "drafter with the target's tokenizer, or drafter='ngram'")


DRAFTER_NAMES = ("ngram", "mtp", "assistant")


def check_construction(drafter, tree, acceptance) -> None:
    """The drafter's type, the tree and the acceptance rule, before any model is loaded or wrapped."""
    from mmspec.kernels import select_kernel

    check_tree(tree)
    if drafter == "ngram":
        ngram_drafter(tree)  # refuses a tree the n-gram drafter cannot draft
    if not (isinstance(drafter, str) and drafter in DRAFTER_NAMES):
        check_drafter(drafter, names="'ngram', 'mtp', 'assistant' (from_pretrained: also a path or hub id)")
    if acceptance is not None:
        select_kernel(False, False, acceptance)


class SpeculativeVLM:
    """A VLM target, its processor and a drafter, composed (diffusers-style: components passed in).

    compile: after the prefill, decode over a static cache with the target's and drafter's forwards compiled
    (`mmspec.compile`); None = on for CUDA (off for sliding-window targets such as Gemma 3)."""

    def __init__(self, target, processor, drafter=None, *, tree=4, acceptance: str | None = None,
                 drafter_processor=None, drafter_tokenizer=None, compile: bool | None = None):
        check_construction(drafter, tree, acceptance)
        self.model, self.processor = target, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.target = VLMTarget(target)
        self.drafter_processor = None
        self.text_drafter = False  # a text-only drafter: it sees the prompt without image parts
        self.drafter = self._make_drafter(drafter, tree, drafter_processor, drafter_tokenizer)
        self.target.want_attention = bool(getattr(self.drafter, "needs_attention", False))
        self.decoder = SpeculativeDecoder(self.target, self.drafter, tree=tree, acceptance=acceptance,
                                          compile=compile)

    # --- construction -------------------------------------------------------------------------------------------
    def _make_drafter(self, drafter, tree, drafter_processor, drafter_tokenizer):
        if drafter is None:
            return NoDrafter()
        if isinstance(drafter, str):
            if drafter == "mtp":  # the target's own MTP layers, read from its checkpoint
                from .drafters import EagleDrafter, MtpHead, MtpModelHead

                native = getattr(self.model.config.get_text_config(), "num_mtp_layers", None) is not None
                head = MtpModelHead.from_target(self.model) if native else MtpHead.from_checkpoint(self.model)
                return EagleDrafter(head, tree)
            if drafter == "assistant":  # Gemma 4's assistant, saved beside the target ("<target>-assistant")
                from .drafters import AssistantDrafter

                return AssistantDrafter(load_drafter(drafter, self.model)[0], tree)
            return ngram_drafter(tree)
        if not isinstance(drafter, torch.nn.Module):
            return drafter  # a Drafter protocol object (feature-level drafters, user plug-ins)
        if is_assistant(drafter):  # Gemma 4's assistant: reads the target's own KV cache
            from .drafters import AssistantDrafter

            return AssistantDrafter(drafter, tree)
        if is_vlm(drafter):  # a small VLM: it sees the image through its own processor (default: the target's)
            self.drafter_processor = drafter_processor or self.processor
            if drafter_tokenizer is not None or drafter_processor is not None:
                check_same_tokenizer(self.tokenizer, drafter_tokenizer or drafter_processor.tokenizer)
            return ModelDrafter(runner=VLMRunner(drafter), tree=tree)
        if drafter_tokenizer is not None:
            check_same_tokenizer(self.tokenizer, drafter_tokenizer)
        self.text_drafter = True
        return ModelDrafter(drafter, tree, shared_tokenizer=drafter_tokenizer is not None)

    @classmethod
    def from_pretrained(cls, target: str, drafter=None, *, dtype=None, device_map=None, tree=4,
                        acceptance: str | None = None, trust_remote_code: bool = False, torch_dtype=None,
                        compile: bool | None = None, **model_kwargs):
        """Load the target (AutoModelForImageTextToText + AutoProcessor) and a drafter given as a path/id: a feature
        drafter saved by `mmspec train-drafter` / `save_pretrained` (EAGLE, EAGLE-3, MSD, DREAM, DFlash; checked to
        be made for this target), a VLM (with its processor) or a causal LM (with its tokenizer), checked to share
        the target's tokenizer.

        Either may name a model of the VLM zoo (`vision.zoo`, trained on first use): ``from_pretrained("zoo:vlm",
        drafter="zoo:vlm-eagle")``; "zoo:NAME@quick" is its quick variant. dtype / device_map as in transformers 5
        (``torch_dtype`` is the old spelling of dtype, still accepted)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from mmspec.compat import renamed

        from .zoo import resolve

        dtype = renamed("dtype", dtype, "torch_dtype", torch_dtype)
        check_construction(drafter if not isinstance(drafter, (str, Path)) or drafter in DRAFTER_NAMES else None,
                           tree, acceptance)
        check_local_path(target, "target")  # both paths before any loading, and never sent to the hub
        if isinstance(drafter, (str, Path)) and drafter not in DRAFTER_NAMES:
            check_local_path(drafter, "drafter")
        target = resolve(target)
        kw = dict(trust_remote_code=trust_remote_code)
        mkw = dict(kw, dtype=dtype, device_map=device_map, **model_kwargs)
        model = _load(AutoModelForImageTextToText, target, "target", **mkw).eval()
        processor = _load(AutoProcessor, target, "target", **kw)
        drafter, extra = load_drafter(drafter, model, tree=tree, trust_remote_code=trust_remote_code,
                                      dtype=dtype, device_map=device_map, **model_kwargs)
        return cls(model, processor, drafter, tree=tree, acceptance=acceptance, compile=compile, **extra)

    # --- generation ---------------------------------------------------------------------------------------------
    def _prepare(self, rows: list[dict], session=None) -> list[Request]:
        """The engine's requests for these rows: the target's processor output, the drafter's view of the prompt
        (a draft VLM's own processor output, a text drafter's ids without image parts) and the chat session."""
        reqs = []
        for row in rows:
            req, msgs, text = build_request(self.processor, images=row.get("images"), prompt=row.get("prompt"),
                                            messages=row.get("messages"))
            view = {}
            if self.drafter_processor is not None:
                dreq = req if self.drafter_processor is self.processor else build_request(
                    self.drafter_processor, images=row.get("images"), prompt=row.get("prompt"),
                    messages=row.get("messages"))[0]
                view = {"draft_prompt": list(dreq.input_ids), "draft_inputs": dict(dreq.inputs)}
            elif self.text_drafter:
                view = {"draft_prompt": text_only_ids(self.processor, msgs, text)}
            reqs.append(req.as_request(session=session, **view))
        return reqs

    def _eos(self, eos_token_id):
        if eos_token_id is not None:
            return eos_token_id
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return eos if eos is not None else self.tokenizer.eos_token_id

    def _stream(self, rows, session=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                repetition_penalty=1.0, seed=None, eos_token_id=None, generator=None):
        # the settings first (the engine's own rules): nothing is loaded or processed for a call that would fail
        check_max_new_tokens(max_new_tokens)
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        check_seed(seed)
        requests = self._prepare(rows, session)
        return self.decoder.stream(requests, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, repetition_penalty=repetition_penalty,
                                   eos_token_id=self._eos(eos_token_id), seed=seed, generator=generator)

    def generate(self, images=None, prompt=None, messages=None, **kwargs) -> VLMOutput:
        """Answer one request, or a batch: prompt=[...] / messages=[[...], ...] with images=[[...], ...]."""
        stream = self._stream(batch_args(images, prompt, messages), **kwargs)
        for _ in stream:
            pass
        return self._output(stream.output)

    def stream(self, images=None, prompt=None, messages=None, **kwargs) -> Iterator[str]:
        """Yield the answer's text piece by piece (one request). `.last_output` is None from the first piece on and
        holds the answer's ids and stats once the stream is exhausted; a stream closed or failed early leaves it None
        (the partial answer has no final stats)."""
        stream = self._stream(batch_args(images, prompt, messages)[:1], **kwargs)
        self.last_output = None
        yield from self._text_pieces(stream)
        self.last_output = self._output(stream.output)

    def _text_pieces(self, stream) -> Iterator[str]:
        generated, printed = [], ""
        for event in stream:
            generated.extend(event.tokens)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.startswith(printed) and len(text) > len(printed):
                yield text[len(printed):]
                printed = text

    def _output(self, out) -> VLMOutput:
        texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in out.sequences]
        return VLMOutput(texts, out.sequences, out.finish_reasons, out.stats)

    def chat(self, system: str | None = None, **generation_kwargs) -> "ChatSession":
        return ChatSession(self, system, generation_kwargs)


@dataclass
class ChatSession:
    """A multi-turn conversation whose target KV cache is reused between turns (text-only follow-ups).

    A turn that fails leaves the conversation as it was before the turn; the cache is then rebuilt on the next one.
    """

    svlm: SpeculativeVLM
    system: str | None = None
    generation_kwargs: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    last_output: VLMOutput | None = None  # the last completed turn's output (None while a turn streams)

    def __post_init__(self):
        if self.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})

    def _turn(self, text: str, images) -> tuple[list[dict], list]:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"text={text!r}: a chat message must be a non-empty string")
        new = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        content = [{"type": "image"}] * len(new) + [{"type": "text", "text": text}]
        return self.messages + [{"role": "user", "content": content}], self.images + new

    def stream(self, text: str, images=None, **kwargs) -> Iterator[str]:
        messages, images_all = self._turn(text, images)
        kw = {**self.generation_kwargs, **kwargs}
        self.last_output = None
        try:
            stream = self.svlm._stream([{"messages": messages, "images": images_all}], session=self, **kw)
            pieces = []
            for piece in self.svlm._text_pieces(stream):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.svlm.target.forget()  # the cache may hold half a turn: never resume from it
            raise
        out = self.svlm._output(stream.output)
        answer = out.text
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images = images_all
        self.last_output = out

    def send(self, text: str, images=None, **kwargs) -> VLMOutput:
        for _ in self.stream(text, images, **kwargs):
            pass
        return self.last_output


def load_drafter(drafter, target, *, tree=4, trust_remote_code: bool = False, dtype=None, device_map=None,
                 torch_dtype=None, **model_kwargs) -> tuple[object, dict]:
    """A drafter given as a path / id / "zoo:NAME" loaded for `target`: (drafter, SpeculativeVLM keyword arguments).

    A feature-drafter checkpoint (EAGLE, EAGLE-3, MSD, DREAM, DFlash) becomes its Drafter; a Gemma 4 assistant loads
    alone (it shares the target's tokenizer and cache); a VLM comes with its processor (``drafter_processor``), a
    causal LM with its tokenizer (``drafter_tokenizer``). Anything else (None, "ngram", a model, a Drafter) is
    returned as it is."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, \
        AutoTokenizer

    from mmspec.compat import renamed

    from .drafters import feature_drafter_kind, load_feature_drafter
    from .zoo import resolve

    dtype = renamed("dtype", dtype, "torch_dtype", torch_dtype)
    if drafter == "assistant":
        drafter = assistant_path(target)
    drafter = resolve(drafter)
    if not isinstance(drafter, (str, Path)) or drafter in ("ngram", "mtp"):
        return drafter, {}  # (SpeculativeVLM makes these from the target)
    drafter = str(drafter)
    check_local_path(drafter, "drafter")  # a missing local path is never sent to the hub
    if feature_drafter_kind(drafter):
        return load_feature_drafter(drafter, target, tree), {}
    kw = dict(trust_remote_code=trust_remote_code)
    mkw = dict(kw, dtype=dtype, device_map=device_map, **model_kwargs)
    cfg = _load(AutoConfig, drafter, "drafter", **kw)
    if getattr(cfg, "model_type", "") in ASSISTANT_TYPES:  # shares the target's tokenizer and KV cache
        return _load(AutoModelForCausalLM, drafter, "drafter", **mkw).eval(), {}
    if hasattr(cfg, "vision_config"):
        return (_load(AutoModelForImageTextToText, drafter, "drafter", **mkw).eval(),
                {"drafter_processor": _load(AutoProcessor, drafter, "drafter", **kw)})
    return (_load(AutoModelForCausalLM, drafter, "drafter", **mkw).eval(),
            {"drafter_tokenizer": _load(AutoTokenizer, drafter, "drafter", **kw)})


ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


def assistant_path(target) -> str:
    """Where `drafter="assistant"` looks for the target's assistant: the target's name or directory with
    "-assistant" appended (Gemma 4's convention: google/gemma-4-e2b-it -> google/gemma-4-e2b-it-assistant)."""
    name = str(getattr(target.config, "name_or_path", "") or "").rstrip("/")
    if not name:
        raise InvalidInputError("drafter='assistant' looks for '<target>-assistant' beside the target, but this "
                                "target was built in memory; pass the assistant's path or id as drafter")
    return name + "-assistant"


def is_assistant(model) -> bool:
    """A Gemma 4 assistant model (drafts over the target's KV cache: `vision.drafters.AssistantDrafter`)."""
    return getattr(getattr(model, "config", None), "model_type", "") in ASSISTANT_TYPES


def _load(loader, path: str, what: str, **kw):
    """`loader.from_pretrained(path)` with every failure a CheckpointError naming the file (mmspec.checkpoint)."""
    return load_pretrained(loader, path, what, **kw)
