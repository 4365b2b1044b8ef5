"""Loading Hugging Face backbones and tokenizers from local directories."""

from __future__ import annotations

import copy
import json
import os

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


def test_weights_in_pytorch_model_bin_load_beside_an_adapters_safetensors(saved_llama):
    """The size check counts the safetensors transformers loads, not every one in the directory."""
    from safetensors.torch import save_file

    original, path = saved_llama
    (path / "model.safetensors").unlink()
    torch.save(original.state_dict(), path / "pytorch_model.bin")
    save_file({"lora_A": torch.zeros(4)}, path / "adapter_model.safetensors")
    loaded = load_backbone(BackboneConfig(path=str(path), attention="sdpa"), vocab_size=100)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, original.get_input_embeddings().weight)


def test_sharded_weights_load_and_their_shards_bound_what_config_json_may_declare(saved_llama):
    """A model saved in shards (an ``.index.json`` beside them, as large checkpoints are) loads, and
    the size check counts every shard the index names: a config declaring far more is refused."""
    original, path = saved_llama
    (path / "model.safetensors").unlink()
    original.save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    loaded = load_backbone(BackboneConfig(path=str(path), attention="sdpa"), vocab_size=100)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, original.get_input_embeddings().weight)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    with pytest.raises(ValueError, match=r"config.json declares a model of at least [\d,]+ parameters .* but its weights hold"):
        load_backbone(BackboneConfig(path=str(path), attention="sdpa"), vocab_size=100)


def test_a_mixture_of_experts_whose_dense_intermediate_size_serves_no_layer_loads(tmp_path):
    """qwen3_moe keeps intermediate_size (6144 by default) for dense layers it may not have: the
    size check bounds such a layer by its experts' own size."""
    from transformers import AutoConfig

    from unimodal.models.backbone import causal_lm_from_pretrained

    config = AutoConfig.for_model("qwen3_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=128, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    assert type(causal_lm_from_pretrained(tmp_path / "moe")).__name__ == "Qwen3MoeForCausalLM"


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


def _hf_tokenizer_directory(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    inner = Tokenizer(models.BPE(unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(directory)
    return directory


def test_a_local_hf_tokenizer_directory_loads(tmp_path):
    tok = load_tokenizer(_hf_tokenizer_directory(tmp_path / "tok"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.decode(tok.encode("tiny corpus")).replace(" ", "") == "tinycorpus"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def _cut(file, keep=100):
    file.write_text(file.read_text()[:keep])


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: _cut(d / "tokenizer.json"), r"tokenizer.json is not valid JSON \(Expecting value at line 7 column 12\); copy the tokenizer"),
    (lambda d: (d / "tokenizer_config.json").write_text("[1]"), r"tokenizer_config.json holds a JSON list, not an object; copy the"),
    (lambda d: (d / "special_tokens_map.json").write_text("nope"), r"special_tokens_map.json is not valid JSON"),
    (lambda d: [f.unlink() for f in d.iterdir()], r"holds no tokenizer.json nor tokenizer_config.json; give a SentencePiece"),
    (lambda d: (d / "tokenizer.json").unlink(), r"cannot be read as a Hugging Face tokenizer \(transformers could not build it"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"\0cut"), r"tokenizer.model cannot be read as a SentencePiece model"),
    (lambda d: os.mkfifo(d / "fifo"), r"fifo is neither a file nor a directory"),
])
def test_a_damaged_tokenizer_is_one_line_naming_it(tmp_path, damage, message):
    """transformers' own errors named no file (a bare JSONDecodeError), ran to pages, or said to
    install a package; a list for a config was an AttributeError."""
    directory = _hf_tokenizer_directory(tmp_path / "tok")
    damage(directory)
    target = next((f for f in (directory / "tokenizer.model", directory / "fifo") if f.exists()), directory)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as caught:
        load_tokenizer(target)
    assert "\n" not in str(caught.value) and str(target) in str(caught.value)


TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 256}


def _unified(config: dict, attention: str):
    from unimodal.modalities.vocab import VocabLayout
    from unimodal.models.unified import UnifiedModel

    torch.manual_seed(0)
    layout = VocabLayout(text_size=120)
    return UnifiedModel(load_backbone(BackboneConfig(config=config, attention=attention), layout.size), layout).eval()


def _one_document(model, ids: torch.Tensor) -> torch.Tensor:
    from unimodal.batch import PackedBatch

    n = ids.shape[1]
    batch = PackedBatch(input_ids=ids, modality_ids=torch.zeros_like(ids), position_ids=torch.arange(n)[None],
                        doc_ids=torch.ones_like(ids), block_ids=torch.full_like(ids, -1), labels=torch.full_like(ids, -100),
                        target_mask=torch.zeros_like(ids, dtype=torch.bool), continuous_mask=torch.zeros_like(ids, dtype=torch.bool),
                        features=torch.zeros(0, 1))
    with torch.no_grad():
        return model.logits(model.hidden_states(batch))[0]


@pytest.mark.parametrize("attention", ["eager", "flex"])
def test_gemma2_soft_caps_reach_the_logits_as_in_its_own_forward(attention):
    """Attention-logit and final-logit soft caps (small here, so that they change the numbers)."""
    config = {"model_type": "gemma2", **TINY, "head_dim": 16, "query_pre_attn_scalar": 16,
              "attn_logit_softcapping": 5.0, "final_logit_softcapping": 0.5}
    model = _unified(config, attention)
    ids = torch.randint(0, 120, (1, 24), generator=torch.Generator().manual_seed(1))
    own = copy.deepcopy(model.backbone)
    own.config._attn_implementation = "eager"  # transformers' reference implementation, its own causal mask
    with torch.no_grad():
        reference = own(ids).logits[0, :, :120]
    torch.testing.assert_close(_one_document(model, ids)[:, :120], reference, atol=1e-4, rtol=1e-4)
    if attention == "flex":  # the engine's cached steps: soft-capped attention over the cache, off the BlockMask
        from conftest import CharTokenizer

        from unimodal.inference.engine import Engine
        from unimodal.models.generation import GenerationSettings
        from unimodal.data.processor import EncodedDocument

        prompt = ids[0, :8].numpy()
        doc = EncodedDocument(ids=prompt, modality=prompt * 0, target=prompt < 0, block=prompt * 0 - 1, continuous=prompt < 0,
                              features=torch.zeros(0, 1).numpy())
        tokens = Engine(model, CharTokenizer()).generate([doc], GenerationSettings(text={"temperature": 0}, max_new_tokens=6))[0]
        expected = own.generate(ids[:, :8], max_new_tokens=6, do_sample=False, suppress_tokens=list(range(120, 256)))[0, 8:]
        generated = [i for s in tokens.segments for i in s.ids]
        assert len(generated) == 6 and generated == expected.tolist()


def test_a_sequence_past_a_sliding_window_is_refused_and_other_architectures_build():
    from unimodal.errors import UserError

    from conftest import CharTokenizer

    from unimodal.batch import PackedBatch
    from unimodal.data.processor import EncodedDocument
    from unimodal.inference.engine import Engine
    from unimodal.models.generation import GenerationSettings

    mistral = _unified({"model_type": "mistral", **TINY, "sliding_window": 8}, "sdpa")
    ids = torch.randint(0, 120, (1, 20))
    with pytest.raises(UserError, match="sliding window of 8 tokens.*a document of 20 tokens"):
        _one_document(mistral, ids)
    # documents within the window, and padding longer than it (padding attends only to itself)
    doc_ids = torch.tensor([[1] * 5 + [2] * 5 + [0] * 10])
    packed = PackedBatch(input_ids=ids, modality_ids=torch.zeros_like(ids), position_ids=torch.arange(20)[None], doc_ids=doc_ids,
                         block_ids=torch.full_like(ids, -1), labels=torch.full_like(ids, -100),
                         target_mask=torch.zeros_like(ids, dtype=torch.bool), continuous_mask=torch.zeros_like(ids, dtype=torch.bool),
                         features=torch.zeros(0, 1))
    with torch.no_grad():
        mistral.hidden_states(packed)
    _one_document(_unified({"model_type": "mistral", **TINY, "sliding_window": None}, "sdpa"), ids)
    # Gemma's sliding layers attend in full too when the window is null, in training and in generation
    gemma = _unified({"model_type": "gemma2", **TINY, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": None}, "eager")
    _one_document(gemma, ids)
    prompt = ids[0, :12].numpy()
    doc = EncodedDocument(ids=prompt, modality=prompt * 0, target=prompt < 0, block=prompt * 0 - 1, continuous=prompt < 0,
                          features=torch.zeros(0, 1).numpy())
    assert Engine(gemma, CharTokenizer()).generate([doc], GenerationSettings(text={"temperature": 0}, max_new_tokens=4))[0].segments
    # an architecture's default pad id (Phi-3: 32000) would name a row past this vocabulary
    phi3 = _unified({"model_type": "phi3", **TINY}, "sdpa")
    assert phi3.backbone.get_input_embeddings().padding_idx is None
