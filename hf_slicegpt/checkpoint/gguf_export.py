"""Write a globally-rotated sliced model (its native export) as a GGUF file for llama.cpp and its kin.

The native export (:func:`hf_slicegpt.checkpoint.export.to_native`) is a plain ``LlamaForCausalLM`` with a smaller
``hidden_size`` and the original head size, so the GGUF is llama.cpp's ``llama`` architecture with
``attention.key_length`` / ``rope.dimension_count`` set to the head size (llama.cpp otherwise derives it as
``hidden_size / heads``). The layout follows llama.cpp's own ``convert_hf_to_gguf.py``: tensor names, the
Q/K row permutation (HF rotates half-split pairs, GGML interleaved pairs), 1-D tensors kept in F32, and
tensors whose rows do not fill whole quantisation blocks kept in F16, as ``llama-quantize`` does.

The tokenizer is written from the Hugging Face tokenizer (byte-level BPE, llama.cpp's ``gpt2`` model): llama.cpp
refuses a file without one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)

#: Output types: name -> (the type of 2-D weights, llama.cpp's file type).
GGUF_DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")


class GGUFExportError(SliceGPTError):
    """This model or tokenizer cannot be written as a GGUF file."""


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dev dependency
        raise GGUFExportError("writing GGUF needs the gguf package: pip install 'hf-slicegpt[gguf]'") from err
    return gguf


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> GGML's interleaved pairs (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# HF LLaMA names -> llama.cpp names, per block.
_BLOCK_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _check_model(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type != "llama":
        raise GGUFExportError(
            f"GGUF export writes llama.cpp's 'llama' architecture; got model_type={config.model_type!r}. "
            "Export a LLaMA-family model (slice with --rotation global --export native first)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError(
            "GGUF export does not write attention or MLP biases; this LLaMA config has them"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(
            f"rope_type={rope.get('rope_type')!r} is not written to GGUF yet; only the default rotary "
            "embedding is supported"
        )


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def tokenizer_metadata(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, pre: str | None = None
) -> dict[str, Any]:
    """llama.cpp's ``tokenizer.*`` fields for a byte-level BPE ``tokenizer`` (as convert_hf_to_gguf writes them).

    ``pre`` names llama.cpp's pre-tokenizer; by default it is read off the tokenizer's own: plain byte-level
    (GPT-2's regex) is ``gpt-2``, single digits split first then byte-level is ``smollm``.
    """
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers) tokenizer; load it with use_fast=True")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(
            f"only byte-level BPE tokenizers (GPT-2 style, llama.cpp's 'gpt2') are written to GGUF; this one is "
            f"{model.get('type')!r}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
        )
    if pre is None:
        pre = _infer_pre(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {item["id"]: item for item in spec.get("added_tokens") or []}
    for item in added.values():
        vocab[item["content"]] = item["id"]
    size = max(vocab.values()) + 1 if vocab else 0
    if size > vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {size - 1} but the model's vocabulary is {vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = int(
                gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED
            )
        else:
            types[index] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def token_id(attribute: str) -> int | None:
        value = getattr(tokenizer, attribute, None)
        return None if value is None else int(value)

    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "unknown_token_id": token_id("unk_token_id"),
        "padding_token_id": token_id("pad_token_id"),
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return meta


def _infer_pre(pre_tokenizer: Mapping[str, Any] | None) -> str:
    parts = []
    if pre_tokenizer:
        parts = (
            pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
        )
    kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if kinds == [("ByteLevel", None)] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", None)] and parts[1].get("use_regex", True):
        return "smollm"
    raise GGUFExportError(
        f"cannot tell which llama.cpp pre-tokenizer matches {json.dumps(pre_tokenizer)[:200]}; pass pre= "
        "(e.g. 'gpt-2', 'llama-bpe', 'smollm') to name it"
    )


def _write_tokenizer(writer: Any, meta: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    writer.add_token_merges(meta["merges"])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
        ("padding_token_id", writer.add_pad_token_id),
    ):
        if meta.get(key) is not None:
            add(meta[key])
    writer.add_add_bos_token(bool(meta["add_bos_token"]))
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])


def _load_source(
    source: str | os.PathLike | PreTrainedModel,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The native LLaMA model (converting a global-rotation sliced one) and the tokenizer saved beside it."""
    from transformers import AutoModelForCausalLM

    from ..modeling.modeling_sliced import SlicedModelForCausalLM
    from ..workflows.loading import load_tokenizer
    from .export import to_native

    tokenizer = None
    if isinstance(source, PreTrainedModel):
        model = source
    else:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise GGUFExportError(f"{path} is not a checkpoint directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        try:
            tokenizer = load_tokenizer(path)  # never runs a checkpoint's code
        except (OSError, ValueError):
            tokenizer = None
    if isinstance(model, SlicedModelForCausalLM):
        model = to_native(model)
    return model, tokenizer


def _tensors(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, float32, Q/K permuted."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = model.state_dict()
    if "lm_head.weight" not in state or getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = model.get_output_embeddings().weight
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if name in _TOP_TENSORS:
            out[_TOP_TENSORS[name]] = array
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in _BLOCK_TENSORS:
            if "rotary_emb" in name:
                continue
            raise GGUFExportError(f"no GGUF name for the tensor {name}")
        local = ".".join(parts[3:])
        if local == "self_attn.q_proj.weight":
            array = _permute(array, heads)
        elif local == "self_attn.k_proj.weight":
            array = _permute(array, kv_heads)
        out[f"blk.{parts[2]}.{_BLOCK_TENSORS[local]}"] = array
    return out


def export_gguf(
    source: str | os.PathLike | PreTrainedModel,
    path: str | os.PathLike,
    *,
    dtype: str = "f16",
    tokenizer: PreTrainedTokenizerBase | None = None,
    pre: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` as a GGUF file at ``path`` and return the path.

    ``source`` is a native-export directory or model (``hf-slicegpt slice --rotation global --export native``),
    or a global-rotation sliced checkpoint or model (converted with :func:`hf_slicegpt.to_native` first).
    ``dtype`` is ``f32``, ``f16`` or ``q8_0`` (8-bit blocks of 32; rows that are not a multiple of 32 wide stay
    F16, as llama.cpp's own quantizer does). The tokenizer saved with a directory is used unless one is given.

    >>> export_gguf("smollm2-native-25", "smollm2-25.q8_0.gguf", dtype="q8_0")  # doctest: +SKIP
    """
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"dtype must be one of {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    target = Path(path)
    if target.suffix != ".gguf":
        raise GGUFExportError(f"{target} must end in .gguf")
    if target.exists() and not overwrite:
        raise GGUFExportError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    model, saved_tokenizer = _load_source(source)
    tokenizer = tokenizer if tokenizer is not None else saved_tokenizer
    if tokenizer is None:
        raise GGUFExportError(
            "llama.cpp needs the tokenizer inside the GGUF: save it beside the checkpoint or pass tokenizer="
        )
    _check_model(model)
    config = model.config
    head_dim = _head_dim(config)
    tokenizer_meta = tokenizer_metadata(tokenizer, config.vocab_size, pre=pre)
    tensors = _tensors(model)

    weight_type, file_type = {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[dtype]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_type("model")
        writer.add_name(name or target.stem)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(int(file_type))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(writer, tokenizer_meta)
        kept = []
        for tensor_name, array in tensors.items():
            qtype = weight_type if array.ndim > 1 else gguf.GGMLQuantizationType.F32
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                if array.shape[-1] % block:
                    kept.append(tensor_name)
                    qtype = gguf.GGMLQuantizationType.F16
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor_name, array.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor_name, array.astype(np.float16))
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        if kept:
            logger.info(
                "%d of %d tensors kept in F16: their rows (%s wide) are not whole Q8_0 blocks of 32",
                len(kept),
                len(tensors),
                sorted({int(tensors[t].shape[-1]) for t in kept}),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("Wrote %s (%s, %d tensors, %d bytes)", target, dtype, len(tensors), target.stat().st_size)
    return target


__all__ = ["GGUF_DTYPES", "GGUFExportError", "export_gguf", "tokenizer_metadata"]
