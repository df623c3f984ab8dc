"""Per-call settings never stick: a call with explicit settings, then one with defaults, equals a fresh pipeline's
call with defaults (also after a call that failed validation), on LlamaGen and on a continuous-token target."""
from __future__ import annotations

import pytest
import torch

from image_ar import SpeculativeImagePipeline
from image_ar.testing import perturbed, tiny_continuous
from image_ar.testing.tiny import tiny_llamagen, tiny_vq
from interleave import read_alternately
from mmspec.errors import InvalidInputError


@pytest.fixture(scope="module")
def target():
    return tiny_llamagen(grid_size=4)


@pytest.fixture(scope="module")
def vq():
    return tiny_vq(codebook_size=64, image_size=8)


def _tokens(pipe, **kw):
    return pipe(class_labels=[1, 2], seed=3, output_type="tokens", **kw).tokens


@pytest.mark.parametrize("explicit", [dict(guidance_scale=7.5), dict(temperature=0.3, top_k=5),
                                      dict(acceptance="lantern", lantern_delta=0.4, lantern_k=50)])
def test_llamagen_defaults_come_back_after_explicit_settings(target, vq, explicit):
    fresh = _tokens(SpeculativeImagePipeline(target, vq, drafter="jacobi"))
    pipe = SpeculativeImagePipeline(target, vq, drafter="jacobi")
    with_settings = _tokens(pipe, **explicit)
    assert not torch.equal(with_settings, fresh)  # the settings did change this call ...
    assert torch.equal(_tokens(pipe), fresh)  # ... and only this call
    assert pipe.target.guidance_scale == 4.0 and pipe(class_labels=[1], output_type="tokens").stats.lossless


def test_llamagen_defaults_come_back_after_a_failed_call(target):
    fresh = _tokens(SpeculativeImagePipeline(target, drafter="jacobi"))
    pipe = SpeculativeImagePipeline(target, drafter="jacobi")
    with pytest.raises(InvalidInputError):
        pipe(class_labels=[1], guidance_scale=7.5, num_tokens=0)  # fails validation after the scale was read
    with pytest.raises(InvalidInputError):
        pipe(class_labels=[1], guidance_scale=7.5, generator=torch.Generator(), seed=1)  # fails inside the call
    assert torch.equal(_tokens(pipe), fresh)


@pytest.mark.parametrize("explicit", [dict(guidance_scale=3.0), dict(temperature=0.5),
                                      dict(guidance_scale=3.0, guidance_schedule="linear"), dict(prefill_ratio=0.75)])
def test_continuous_defaults_come_back_after_explicit_settings(explicit):
    model = tiny_continuous(0)
    drafter = perturbed(model, 0.0)  # a copy: every draft is accepted, so no residual sampling in the tiny model

    def pipe_():
        return SpeculativeImagePipeline(model, drafter=drafter)

    fresh = _tokens(pipe_())
    pipe = pipe_()
    assert not torch.equal(_tokens(pipe, **explicit), fresh)
    assert torch.equal(_tokens(pipe), fresh)


@pytest.mark.parametrize("drafter", [None, "jacobi"])
def test_a_request_samples_the_same_alone_and_in_a_batch_of_8(target, vq, drafter):
    pipe = SpeculativeImagePipeline(target, vq, drafter=drafter)
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
    batch = pipe(class_labels=labels, generator=gens, top_k=20, output_type="tokens").tokens
    for i in (0, 5):
        alone = pipe(class_labels=[labels[i]], generator=torch.Generator().manual_seed(100 + i), top_k=20,
                     output_type="tokens").tokens
        assert torch.equal(alone[0], batch[i])


def test_tree_is_the_one_draft_length_name(target):
    """tree= as in the engine and SpeculativeVLM; draft_tokens= and window= (= tree + 1) still work, with a warning."""
    from image_ar.drafters.model import ImageModelDrafter

    assert SpeculativeImagePipeline(target, drafter="jacobi", tree=4).drafter.window == 5
    assert SpeculativeImagePipeline(target, drafter="jacobi").drafter.window == 16
    assert SpeculativeImagePipeline(target, drafter=target, tree=2).drafter.k == 2
    assert SpeculativeImagePipeline(target, drafter=target).drafter.k == 4
    with pytest.warns(FutureWarning, match=r"window= is the old spelling of tree= \(window=5 is tree=4\)"):
        assert SpeculativeImagePipeline(target, drafter="jacobi", window=5).drafter.window == 5
    with pytest.warns(FutureWarning, match="draft_tokens= is the old spelling of tree="):
        pipe = SpeculativeImagePipeline(target, drafter=target, draft_tokens=3)
    assert isinstance(pipe.drafter, ImageModelDrafter) and pipe.drafter.k == 3
    for bad in (0, "3", 2.5):
        with pytest.raises(InvalidInputError, match="tree="):
            SpeculativeImagePipeline(target, drafter="jacobi", tree=bad)
    with pytest.raises(InvalidInputError, match="window=1"):
        SpeculativeImagePipeline(target, drafter="jacobi", window=1)


@pytest.mark.parametrize("drafter", ["jacobi", "model"])
def test_interleaved_image_streams_with_different_settings_equal_each_alone(target, vq, drafter):
    """Two image streams on one pipeline, read alternately, each with its own guidance scale and sampling settings,
    give what each gives alone; a half-read stream resumed after another call on the pipeline ends the same."""
    pipe = SpeculativeImagePipeline(target, vq, drafter=perturbed(target, 0.3) if drafter == "model" else drafter,
                                    tree=3)
    kw_a = dict(class_labels=[1, 2], guidance_scale=7.5, seed=3, output_type="tokens")
    kw_b = dict(class_labels=[5], temperature=0.0, num_tokens=11, output_type="tokens")
    alone_a, alone_b = pipe(**kw_a).tokens, pipe(**kw_b).tokens
    a, b = pipe.stream(**kw_a), pipe.stream(**kw_b)
    read_alternately(a, b)
    assert torch.equal(a.output.tokens, alone_a) and torch.equal(b.output.tokens, alone_b)
    half = pipe.stream(**kw_a)
    next(half)
    assert torch.equal(pipe(**kw_b).tokens, alone_b)
    for _ in half:
        pass
    assert torch.equal(half.output.tokens, alone_a)


def test_interleaved_continuous_streams_with_different_settings_equal_each_alone():
    model = tiny_continuous(0)
    pipe = SpeculativeImagePipeline(model, drafter=perturbed(model, 0.05), tree=3)
    kw_a = dict(class_labels=[1, 2], seed=3, output_type="tokens")
    kw_b = dict(class_labels=[0], seed=8, guidance_scale=3.0, guidance_schedule="linear", temperature=0.7,
                prefill_ratio=0.25, output_type="tokens")
    alone_a, alone_b = pipe(**kw_a).tokens, pipe(**kw_b).tokens
    a, b = pipe.stream(**kw_a), pipe.stream(**kw_b)
    read_alternately(a, b)
    assert torch.equal(a.output.tokens, alone_a) and torch.equal(b.output.tokens, alone_b)


@pytest.mark.parametrize("drafter", ["jacobi"])
def test_image_requests_with_their_own_settings_draw_alone_what_they_draw_in_a_batch(target, drafter):
    """Image requests whose sampling settings differ (greedy, top-k, temperatures) in one engine batch: each gives
    what it gives alone. (Not asserted for the draft-model drafter: its batched ragged forwards round differently
    from a single row's, so its q, and a sampled request's draws, can differ in the last bits even with one
    setting for all; its output distribution is exact either way.)"""
    import dataclasses

    from image_ar import LlamaGenTarget
    from image_ar.drafters import ImageModelDrafter, JacobiDrafter
    from mmspec import SpeculativeDecoder
    from mmspec.sampling import SamplingSpec

    tgt = LlamaGenTarget(target, 4.0)

    def make():
        d = JacobiDrafter(4) if drafter == "jacobi" else ImageModelDrafter(perturbed(target, 0.3), 3)
        return SpeculativeDecoder(tgt, d)

    specs = [SamplingSpec(), SamplingSpec(temperature=1.0, top_k=20), SamplingSpec(temperature=0.7),
             SamplingSpec(temperature=1.0)]
    labels = [1, 2, 3, 4]

    def reqs(idx):
        out = tgt.requests([labels[i] for i in idx])
        return [dataclasses.replace(r, sampling=specs[i], generator=torch.Generator().manual_seed(30 + i))
                for r, i in zip(out, idx)]

    n = tgt.num_image_tokens
    together = make().generate(reqs(range(4)), max_new_tokens=n).sequences
    for i in range(4):
        assert make().generate(reqs([i]), max_new_tokens=n).sequences[0] == together[i], (drafter, i)
