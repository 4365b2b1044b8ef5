"""Loading the Hugging Face decoder-only backbone from a local directory or a config."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, ChameleonConfig, ChameleonForConditionalGeneration, PretrainedConfig, PreTrainedModel

from unimodal.errors import UserError
from unimodal.modalities.base import load_pretrained, model_config, model_files_read, weight_file
from unimodal.models.attention import resolve_backend
from unimodal.models.sharding import gathered

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Either ``path`` (a local HF model directory) or ``config`` (a dict with ``model_type``) is set.

    ``attention`` is ``auto`` (FlexAttention on CUDA, else SDPA) | ``flex`` | ``sdpa`` | ``xformers`` | ``eager``; ``dtype`` is the weight dtype
    at load time (training precision is the trainer's ``precision``).

    Memory and speed levers (docs/training.md, "Scaling up"): ``gradient_checkpointing``
    recomputes each decoder layer in backward; ``compile`` runs every decoder layer through
    ``torch.compile`` (training only); ``ce_chunk`` computes the cross-entropy over that many
    target tokens at a time, recomputing their logits in backward, so the full-vocabulary fp32
    logits of a batch never exist at once (0: all at once).
    """

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    attention: str = "auto"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    compile: bool = False
    ce_chunk: int = 0


# Backbones transformers files elsewhere than AutoModelForCausalLM (Orthus runs on Chameleon,
# listed under image-text-to-text only). Looked up here rather than registered with
# ``AutoModelForCausalLM.register``, which transformers 5.17 silently ignores for its own configs.
CAUSAL_LM_ELSEWHERE: dict[type[PretrainedConfig], type[PreTrainedModel]] = {ChameleonConfig: ChameleonForConditionalGeneration}
# Submodules a backbone class carries but its language path never runs (Chameleon's VQ-VAE: the
# framework's codecs tokenise images). Kept so the checkpoint saves and loads whole, and frozen
# whatever the trainable policy says: parameters that never get a gradient make DDP fail on the
# second step and take optimiser memory.
UNUSED_SUBMODULES: dict[type[PreTrainedModel], tuple[str, ...]] = {ChameleonForConditionalGeneration: ("model.vqmodel",)}


def freeze_unused(model: PreTrainedModel) -> None:
    """Freeze the :data:`UNUSED_SUBMODULES` of ``model``'s class."""
    for name in UNUSED_SUBMODULES.get(type(model), ()):
        model.get_submodule(name).requires_grad_(False)


def causal_lm_from_config(config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
    """A randomly initialised causal LM of ``config``."""
    cls = CAUSAL_LM_ELSEWHERE.get(type(config))
    # ``_from_config`` is what ``AutoModelForCausalLM.from_config`` itself calls on the class
    return cls._from_config(config, **kwargs) if cls else AutoModelForCausalLM.from_config(config, **kwargs)


def import_backbone_class(spec: BackboneConfig) -> None:
    """Import the module of the class :func:`load_backbone` will build, without building it.

    ZeRO-3's ``zero.Init`` wraps the ``__init__`` of every module class defined while it is active
    and, when it ends, puts back the ``__init__`` it wrapped. A class first imported inside it whose
    ``__init__`` a decorator replaces afterwards (transformers >= 5.25 decorates attention classes
    through the ``kernels`` package) then loses that decorator for every later model built in the
    process, and its forward fails. Importing first keeps the class out of ``zero.Init``'s reach."""
    try:  # what is missing or wrong, the build itself says in its own words
        raw = model_config(spec.path, "backbone.path") if spec.path is not None else dict(spec.config)
        config_class = type(AutoConfig.for_model(raw["model_type"]))
    except (OSError, ValueError, TypeError, KeyError):
        return
    if config_class not in CAUSAL_LM_ELSEWHERE and config_class in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM._model_mapping[config_class]  # noqa: B018 - the lookup imports the module


def causal_lm_from_pretrained(path: Path, whole: bool = False, **kwargs: Any) -> PreTrainedModel:
    """The causal LM saved in the local directory ``path``, read by :func:`load_pretrained` (every
    damaged or foreign directory is one line naming it, a ``config.json`` that declares far more
    than its weights hold too, before anything is allocated). The :data:`UNUSED_SUBMODULES` may
    be absent unless ``whole`` (a conversion that reads them)."""
    if weight_file(path) is None:
        raise FileNotFoundError(f"{path} holds no model weights (model.safetensors or pytorch_model.bin, whole or sharded "
                                "with an .index.json); copy the model directory whole")
    with model_files_read(path, building=True):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    cls = CAUSAL_LM_ELSEWHERE.get(type(config), AutoModelForCausalLM)
    unused = () if whole else tuple(f"{name}." for name in UNUSED_SUBMODULES.get(cls, ()))  # never run: a checkpoint may leave them out
    return load_pretrained(cls, path, optional=unused, **kwargs)


def load_backbone(spec: BackboneConfig, vocab_size: int) -> PreTrainedModel:
    """Build or load the causal LM, with its vocabulary sized to ``vocab_size`` rows."""
    if (spec.path is None) == (not spec.config):
        raise ValueError("backbone: set exactly one of 'path' (local model directory) or 'config' (with model_type)")
    attn = resolve_backend(spec.attention)
    if spec.dtype not in DTYPES:
        raise ValueError(f"backbone.dtype {spec.dtype!r} is not one of {list(DTYPES)}")
    dtype = DTYPES[spec.dtype]
    if spec.path is not None:
        path = Path(spec.path)
        model_config(path, "backbone.path")
        model = causal_lm_from_pretrained(path, attn_implementation=attn, dtype=dtype)
        if model.get_input_embeddings().num_embeddings != vocab_size:
            resize_vocabulary(model, vocab_size)
    else:
        raw = dict(spec.config)
        if "model_type" not in raw:
            raise ValueError("backbone.config needs a 'model_type' (e.g. llama, qwen2, mistral)")
        model_type = raw.pop("model_type")
        check_config_keys(model_type, raw)
        # an architecture's default pad id names a row of its own vocabulary (Phi-3: 32000, OLMo-2:
        # 1), which nn.Embedding would keep at zero, untrained: padding here is masked, not embedded
        raw.setdefault("pad_token_id", None)
        config = AutoConfig.for_model(model_type, **raw, vocab_size=vocab_size)
        if raw.get("sliding_window", 0) is None and getattr(config, "layer_types", None):
            # full attention asked for; Gemma builds a sliding mask for its sliding layers whatever they
            # are, so their window becomes the whole context
            config.sliding_window = config.max_position_embeddings
        model = causal_lm_from_config(config, attn_implementation=attn, dtype=dtype)
    if spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def attention_window(config: Any) -> int | None:
    """The sliding window some layers of the backbone attend within (Mistral, Gemma 2/3, Qwen 2
    with ``use_sliding_window``), or None when every layer attends in full."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def check_window(window: int | None, length: int) -> None:
    """The packed masks here attend in full: a sequence longer than the backbone's sliding window
    (:func:`attention_window`) would attend further than the model does, so it is refused rather
    than silently changed."""
    if window is not None and length > window:
        raise UserError(
            f"this backbone attends within a sliding window of {window} tokens, which unimodal's attention masks do not "
            f"apply, and a document of {length} tokens would see past it: keep documents and chats within {window} tokens "
            "(a backbone built from config may instead set sliding_window: null to attend in full)"
        )


def check_config_keys(model_type: str, given: dict[str, Any]) -> None:
    """transformers keeps any key it does not know as an attribute, so a misspelt one
    (``hiden_size``) would build the default size without a word: every key must be one the config
    class has or takes."""
    defaults = AutoConfig.for_model(model_type)
    known = set(defaults.to_dict()) | set(defaults.attribute_map) | set(inspect.signature(type(defaults).__init__).parameters)
    unknown = sorted(set(given) - known)
    if unknown:
        near = {key: difflib.get_close_matches(key, sorted(known), n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {near[key][0]!r}?)" if near[key] else "") for key in unknown)
        raise ValueError(f"backbone.config: {named} is not a setting of {type(defaults).__name__} (model_type {model_type!r})")


@lru_cache(maxsize=None)
def cache_keyword(decoder_class: type[torch.nn.Module]) -> str:
    """The decoder's name for its KV-cache argument: transformers 5.24 renamed ``past_key_values``
    (and warns about the old one) to ``cache``; 5.17 has only the old name."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def resize_vocabulary(model: PreTrainedModel, vocab_size: int) -> None:
    """Give the embedding tables ``vocab_size`` rows; added rows start as transformers'
    ``mean_resizing`` starts them, near the old rows' mean (:func:`start_rows_near_mean`). Done
    here because transformers' own ZeRO-3 path for it writes into a partition it has not gathered
    (5.24: an IndexError)."""
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size > old:
        start_rows_near_mean(model, old, vocab_size, reference=old)


def embedding_tables(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The input embedding weight, and the output one when it is not tied to it."""
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    return tables


def start_rows_near_mean(model: PreTrainedModel, start: int, stop: int, reference: int) -> None:
    """Rows ``start:stop`` of the embedding tables become the mean of rows ``:reference`` plus noise
    of 1e-5 of their variance (per dimension), so that the new rows start apart but where the
    model expects an embedding (gathered first under ZeRO-3)."""
    tables = embedding_tables(model)
    with gathered(tables, modifier_rank=0), torch.no_grad():
        for weight in tables:
            known = weight[:reference].float()
            noise = torch.randn(stop - start, weight.shape[1], device=weight.device) * (1e-5 * known.var(0)).sqrt()
            weight[start:stop] = (known.mean(0) + noise).to(weight.dtype)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward (non-reentrant: frozen inputs and LoRA are fine).
    transformers 5.24 renamed the switch; 5.17 has only the old name."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def compile_layers(model: PreTrainedModel, backend: str = "inductor") -> None:
    """Compile each decoder layer in place: one graph per layer type keeps compile time flat in
    depth, and the mask, embeddings and heads around the layers stay eager."""
    for layer in model.get_decoder().layers:
        layer.compile(backend=backend)
