"""The supported transformers range (5.2 .. newest 5.x): cache keyword, layer API, no deprecation warnings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

import heterocache as hc
from heterocache.cache import _query_length as query_length
from heterocache.hf import cache_keyword, cache_kwargs


def test_cache_keyword_follows_the_installed_forward():
    model = tiny_model("qwen2")
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert cache_keyword(model) == cache_keyword() == expected
    assert cache_kwargs("C", model) == {expected: "C"}
    cache = hc.make_cache(model, "snapkv", 0.5)
    with pytest.raises(TypeError, match=r"cache_kwargs\(cache, model\): pass the cache first"):
        cache_kwargs(model, cache)


def test_layer_api_of_both_versions():
    """5.2 made get_max_cache_shape abstract (HeadwiseLayer could not be built) and passes
    cache_position to get_mask_sizes; newer versions pass the query length."""
    model = tiny_model("llama")
    cache = hc.make_cache(model, "snapkv", 0.5)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 40)), **cache_kwargs(cache, model))
    layer = cache.layers[0]
    assert layer.get_max_cache_shape() == layer.get_max_length() == -1
    assert layer.get_mask_sizes(torch.arange(40, 43)) == layer.get_mask_sizes(3) == (43, 0)
    assert query_length(torch.arange(5)) == query_length(5) == 5


def test_no_deprecation_warning_with_cache_kwargs():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            model(ids, **cache_kwargs(DynamicCache(), model))
            model.generate(ids, **cache_kwargs(hc.make_cache(model, "snapkv", 0.5), model), max_new_tokens=3,
                           do_sample=False)
