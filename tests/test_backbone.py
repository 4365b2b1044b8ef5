"""Loading Hugging Face backbones and tokenizers from local directories."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unimodal.data.tokenizer import load_tokenizer
from unimodal.models.backbone import BackboneConfig, load_backbone


@pytest.fixture
def saved_llama(tmp_path, tiny_llama_config):
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_llama_config.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, **config)).eval()
    model.save_pretrained(tmp_path / "llama")
    return model, tmp_path / "llama"


def test_a_local_model_loads_and_its_vocabulary_grows_without_changing_old_rows(saved_llama):
    original, path = saved_llama
    loaded = load_backbone(BackboneConfig(path=str(path), attention="sdpa"), vocab_size=128).eval()
    assert loaded.get_input_embeddings().num_embeddings == 128
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits[..., :100], original(ids).logits, rtol=1e-4, atol=1e-4)
    # the directory itself is untouched: transformers still loads it as it was
    assert AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().num_embeddings == 100


def test_backbone_spec_errors_are_clear(tmp_path, tiny_llama_config):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_backbone(BackboneConfig(path=str(tmp_path / "missing")), 64)
    with pytest.raises(ValueError, match="exactly one of"):
        load_backbone(BackboneConfig(path=str(tmp_path), config=tiny_llama_config), 64)
    with pytest.raises(ValueError, match="model_type"):
        load_backbone(BackboneConfig(config={"hidden_size": 8}), 64)
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        load_backbone(BackboneConfig(config=tiny_llama_config, attention="flash"), 64)
    # transformers keeps unknown keys as attributes: a typo built the default size silently
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\) is not a setting of LlamaConfig"):
        load_backbone(BackboneConfig(config={**tiny_llama_config, "hiden_size": 32}), 64)


def test_a_local_hf_tokenizer_directory_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    inner = Tokenizer(models.BPE(unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.decode(tok.encode("tiny corpus")).replace(" ", "") == "tinycorpus"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
