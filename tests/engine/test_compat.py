"""mmspec.compat: caches are passed under the name each transformers callable declares."""
from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mmspec.compat import cache_kwargs, cache_name, output_cache


class _OldStyle(torch.nn.Module):
    def forward(self, x, past_key_values=None):
        return past_key_values


def _old_function(x, past_key_values=None):
    return past_key_values


def test_the_declared_name_is_used_new_or_old():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    assert cache_name(model) == "cache" and cache_name(model.forward) == "cache"
    assert cache_name(_OldStyle()) == "past_key_values" and cache_name(_old_function) == "past_key_values"
    old = _OldStyle()
    assert old(1, **cache_kwargs(old, "kv")) == "kv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning on the way in
        out = model(torch.tensor([[1, 2, 3]]), **cache_kwargs(model, DynamicCache(config=cfg)), use_cache=True)
    assert output_cache(out).get_seq_length() == 3


def test_renamed_keywords_warn_and_still_work():
    import pytest

    from mmspec.compat import renamed
    from mmspec.errors import InvalidInputError

    assert renamed("dtype", "a", "torch_dtype", None) == "a" and renamed("dtype", None, "torch_dtype", None, 7) == 7
    with pytest.warns(FutureWarning, match="torch_dtype= is the old spelling of dtype="):
        assert renamed("dtype", None, "torch_dtype", "b") == "b"
    with pytest.raises(InvalidInputError, match="pass only dtype="):
        renamed("dtype", "a", "torch_dtype", "b")


def test_image_pipeline_takes_device_map_and_the_old_device(tmp_path):
    import pytest

    from image_ar import SpeculativeImagePipeline
    from image_ar.testing.tiny import tiny_llamagen

    d = tiny_llamagen(grid_size=3).save_pretrained(tmp_path / "t")
    assert SpeculativeImagePipeline.from_pretrained(d, device_map="cpu").target.device.type == "cpu"
    with pytest.warns(FutureWarning, match="device= is the old spelling of device_map="):
        SpeculativeImagePipeline.from_pretrained(d, device="cpu")
