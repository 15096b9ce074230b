"""Adapter shape tests: keep-everything is identical, shrunk equals masked, removal leaves the residual."""
import copy

import pytest
import torch
import transformers

from planner.adapters import get_adapter, supported_model_types
from planner.adapters.checkpoint import load_model
from planner.errors import UnsupportedModel

from .conftest import inputs, make_tiny, mask_removed_


def _out(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_keep_everything_is_identical(tmp_path, model_type):
    m, ad = load_model(make_tiny(tmp_path / model_type, model_type))
    x = inputs(m.config.vocab_size)
    ref = _out(m, x)
    for layer in ad.layers(m):
        ad.shrink_(layer, "attn", torch.arange(4), None, m.config)
        ad.shrink_(layer, "ffn", torch.arange(128), None, m.config)
    assert torch.equal(_out(m, x), ref)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("heads,ffn", [([0, 2], [1, 5, 7, 100]), ([], list(range(0, 128, 3))), ([1, 2, 3], []), ([], [])])
def test_shrunk_equals_masked(tmp_path, model_type, heads, ffn):
    m, ad = load_model(make_tiny(tmp_path / model_type, model_type))
    masked = copy.deepcopy(m)
    x = inputs(m.config.vocab_size)
    hd = m.config.hidden_size // m.config.num_attention_heads
    for i, layer in enumerate(ad.layers(m)):
        ad.shrink_(layer, "attn", torch.tensor(heads, dtype=torch.long), None, m.config)
        ad.shrink_(layer, "ffn", torch.tensor(ffn, dtype=torch.long), None, m.config)
        mask_removed_(ad.layers(masked)[i], ad, "attn", heads, hd)
        mask_removed_(ad.layers(masked)[i], ad, "ffn", ffn, 1)
    assert [s.to_dict() for s in ad.spec(m)] == [{"heads": len(heads), "ffn": len(ffn)}] * 2
    torch.testing.assert_close(_out(m, x), _out(masked, x), atol=1e-5, rtol=1e-5)
    # the model is physically smaller
    n = sum(p.numel() for p in m.parameters())
    assert n < sum(p.numel() for p in masked.parameters())


def test_consumer_weight_is_used(tmp_path):
    m, ad = load_model(make_tiny(tmp_path / "b"))
    layer = ad.layers(m)[0]
    w = torch.randn(64, 3)
    ad.shrink_(layer, "ffn", torch.tensor([4, 9, 2]), w, m.config)
    assert torch.equal(layer.output.dense.weight, w)
    assert layer.intermediate.dense.out_features == 3


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModel) as e:
        get_adapter("mamba9000")
    for t in supported_model_types():
        assert t in str(e.value)


def test_classification_head_model_roundtrip(tmp_path):
    from planner.adapters.checkpoint import save_portable
    src = make_tiny(tmp_path / "cls", arch="BertForSequenceClassification")
    m, ad = load_model(src)
    assert isinstance(m, transformers.BertForSequenceClassification)
    ad.shrink_(ad.layers(m)[1], "attn", torch.tensor([1]), None, m.config)
    x = inputs(m.config.vocab_size)
    with torch.no_grad():
        ref = m(**x).logits
    save_portable(m, ad, src, tmp_path / "out")
    m2, _ = load_model(tmp_path / "out")
    assert type(m2).__name__ == "PlannerBertForSequenceClassification"
    with torch.no_grad():
        assert torch.equal(m2(**x).logits, ref)
