"""Hugging Face Qwen3 <-> Megatron-Core weights: config checks, name/layout mapping, and the loader for
``checkpoint.init_from=hf:PATH`` (:func:`load_hf_into_model`). The commands are in :mod:`phsa_train.convert`.

Name/layout mapping (Megatron local spec, verified by the logits tests)::

    model.embed_tokens.weight                     embedding.word_embeddings.weight (rows padded)
    model.layers.N.input_layernorm.weight         decoder.layers.N.input_layernorm.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight  decoder.layers.N.self_attention.linear_qkv.weight
        (per KV group g: [q heads of g ..., k_g, v_g], Megatron's interleaved GQA layout)
    model.layers.N.self_attn.o_proj.weight        decoder.layers.N.self_attention.linear_proj.weight
    model.layers.N.self_attn.{q,k}_norm.weight    decoder.layers.N.self_attention.{q,k}_layernorm.weight
        (both per-head RMSNorm weights of size head_dim)
    model.layers.N.post_attention_layernorm.weight decoder.layers.N.pre_mlp_layernorm.weight
    model.layers.N.mlp.{gate,up}_proj.weight      decoder.layers.N.mlp.linear_fc1.weight ([gate; up])
    model.layers.N.mlp.down_proj.weight           decoder.layers.N.mlp.linear_fc2.weight
    model.norm.weight                             decoder.final_layernorm.weight
    lm_head.weight                                output_layer.weight (untied only)

RoPE needs no weights: both sides use the non-interleaved rotate-half form (Megatron's
``rotary_interleaved=False`` default) with ``inv_freq = base^(-2i/head_dim)``.

Strictness: every tensor of the HF checkpoint must be consumed and every model parameter assigned,
with the exact expected shape; otherwise :class:`ConversionError` names the keys. Unsupported
architectures (MoE, Qwen2 without QK-norm, attention bias, sliding window, RoPE scaling, non-SiLU MLP)
are refused up front.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Copied next to the Megatron checkpoint at import and back at export (everything but weights/config).
HF_ASSET_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
HF_ASSETS_DIR = "hf_assets"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """Unsupported checkpoint, config mismatch or incomplete mapping; the message names the keys."""


# --------------------------------------------------------------------------------------------------
# HF side: config and tensors
# --------------------------------------------------------------------------------------------------

def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face model directory)")
    return json.loads(path.read_text())


def hf_rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConversionError("config.json has no rope_theta (neither top-level nor in rope_parameters)")
    return float(theta)


def check_hf_config(hf: dict) -> None:
    """Refuse everything that is not a dense Qwen3 our GPTModel reproduces exactly."""
    mt = hf.get("model_type")
    arch = ", ".join(hf.get("architectures") or []) or "?"
    problems = []
    if mt != "qwen3":
        hint = {"qwen3_moe": "Mixture-of-Experts Qwen3 is not supported (dense Qwen3 only)",
                "qwen2": "Qwen2 has attention biases and no QK-norm; only Qwen3 is supported",
                "qwen2_moe": "Mixture-of-Experts Qwen2 is not supported"}.get(mt, "only model_type 'qwen3' is supported")
        raise ConversionError(f"unsupported architecture: model_type={mt!r} ({arch}): {hint}")
    if any(k in hf for k in ("num_experts", "num_local_experts", "moe_intermediate_size")):
        problems.append("Mixture-of-Experts fields (num_experts/moe_intermediate_size)")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true (our Megatron model has add_bias_linear=False)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only silu / SwiGLU)")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true")
    scaling = hf.get("rope_scaling")
    rp = hf.get("rope_parameters") or {}
    if scaling or rp.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling ({scaling or rp}) (only the default RoPE)")
    if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
        problems.append("layer_types other than full_attention")
    if problems:
        raise ConversionError(f"unsupported Qwen3 variant ({arch}): " + "; ".join(problems))


def hf_dims(hf: dict) -> dict:
    """Qwen3 config.json -> our ModelConfig field values."""
    heads = hf["num_attention_heads"]
    return {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"], "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "rotary_base": hf_rope_theta(hf), "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "vocab_size": hf["vocab_size"],
    }


def hf_model_overrides(hf: dict, name: Optional[str] = None) -> list[str]:
    """Hydra overrides that make ``cfg.model`` describe this HF checkpoint."""
    d = hf_dims(hf)
    ov = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()]
    ov += ["model.normalization=RMSNorm", "model.qk_layernorm=true", "model.gated_linear_unit=true",
           f"model.max_position_embeddings={max(hf.get('max_position_embeddings', 4096), 4096)}"]
    if name:
        ov.append(f"model.name={name}")
    return ov


def check_model_matches_hf(model_cfg, hf: dict) -> None:
    """Every architectural field of ``cfg.model`` must equal the checkpoint's; else name them all."""
    d = hf_dims(hf)
    bad = []
    for k, v in d.items():
        ours = getattr(model_cfg, k)
        if k == "vocab_size":
            if ours is not None and ours != v:  # None: the vocabulary comes from the tokenizer
                bad.append(f"model.vocab_size={ours} but the checkpoint has vocab_size={v}")
            continue
        same = abs(float(ours) - float(v)) <= 1e-12 * max(1.0, abs(float(v))) if isinstance(v, float) else ours == v
        if not same:
            bad.append(f"model.{k}={ours} but the checkpoint has {v}")
    for k, want in (("normalization", "RMSNorm"), ("qk_layernorm", True), ("gated_linear_unit", True)):
        if getattr(model_cfg, k) != want:
            bad.append(f"model.{k}={getattr(model_cfg, k)} but Qwen3 needs {want}")
    if bad:
        raise ConversionError("the model config does not match the HF checkpoint: " + "; ".join(bad))


def load_hf_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model directory (safetensors, sharded or not; or pytorch_model*.bin)."""
    src = Path(src)
    if (src / "model.safetensors.index.json").exists() or (src / "model.safetensors").exists():
        from safetensors.torch import load_file

        idx = src / "model.safetensors.index.json"
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
        sd = {}
        for f in files:
            sd.update(load_file(str(src / f)))
        return sd
    if (src / "pytorch_model.bin.index.json").exists() or (src / "pytorch_model.bin").exists():
        idx = src / "pytorch_model.bin.index.json"
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["pytorch_model.bin"]
        sd = {}
        for f in files:
            sd.update(torch.load(src / f, map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(f"{src}: no weights ({' / '.join(HF_WEIGHT_FILES)})")


# --------------------------------------------------------------------------------------------------
# The mapping (full, unsharded tensors; Megatron names of a TP=1 PP=1 model)
# --------------------------------------------------------------------------------------------------

def _pad_rows(t: torch.Tensor, rows: int, keep: Optional[int] = None) -> torch.Tensor:
    """Pad (zeros) or cut the vocabulary rows of an embedding / output matrix to ``rows``."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] < rows:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)
    if keep is None or keep > rows:
        raise ConversionError(f"the checkpoint's vocabulary has {t.shape[0]} rows but the model only {rows} "
                              f"(padded from {keep if keep is not None else '?'} tokenizer entries); use the "
                              "checkpoint's tokenizer (data.tokenizer=<HF dir>) or a larger padded vocabulary")
    return t[:rows]


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """HF q/k/v projections -> Megatron linear_qkv: per group [q heads of the group..., k, v]."""
    h = q.shape[1]
    return torch.cat([q.reshape(groups, -1, h), k.reshape(groups, head_dim, h), v.reshape(groups, head_dim, h)],
                     dim=1).reshape(-1, h)


def qkv_from_megatron(w: torch.Tensor, heads: int, groups: int, head_dim: int):
    h = w.shape[1]
    per = heads // groups
    q, k, v = torch.split(w.reshape(groups, (per + 2) * head_dim, h), [per * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, h).clone(), k.reshape(-1, h).clone(), v.reshape(-1, h).clone()


def _expected_hf_shapes(d: dict) -> dict[str, tuple]:
    h, f, hd = d["hidden_size"], d["ffn_hidden_size"], d["kv_channels"]
    nq, nkv, V = d["num_attention_heads"] * hd, d["num_query_groups"] * hd, d["vocab_size"]
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    if not d["tie_embeddings"]:
        shapes["lm_head.weight"] = (V, h)
    for i in range(d["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq, h), p + "self_attn.k_proj.weight": (nkv, h),
            p + "self_attn.v_proj.weight": (nkv, h), p + "self_attn.o_proj.weight": (h, nq),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


def hf_to_megatron_tensors(hf_sd: dict[str, torch.Tensor], hf: dict, padded_vocab: int,
                           tokenizer_vocab: Optional[int] = None) -> "OrderedDict[str, torch.Tensor]":
    """HF Qwen3 tensors -> full Megatron tensors (TP=1 names, global layer numbers).

    Raises ConversionError unless every HF tensor is consumed with exactly the expected shape.
    """
    d = hf_dims(hf)
    if tokenizer_vocab is not None and tokenizer_vocab > d["vocab_size"]:
        raise ConversionError(f"the data tokenizer has {tokenizer_vocab} entries but the HF checkpoint's vocabulary "
                              f"only {d['vocab_size']}: use the checkpoint's tokenizer (data.tokenizer=<HF dir>)")
    sd = dict(hf_sd)
    if not any(k.startswith("model.") for k in sd) and "embed_tokens.weight" in sd:  # a bare Qwen3Model
        sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in sd.items()}
    if d["tie_embeddings"] and "lm_head.weight" in sd:
        lm = sd.pop("lm_head.weight")
        if "model.embed_tokens.weight" in sd and not torch.equal(lm, sd["model.embed_tokens.weight"]):
            raise ConversionError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
    expected = _expected_hf_shapes(d)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} (config implies {expected[k]})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        msg = []
        if missing:
            msg.append(f"missing tensors {_short(missing)}")
        if unexpected:
            msg.append(f"tensors with no Megatron counterpart {_short(unexpected)}")
        if wrong:
            msg.append(f"shape mismatch {_short(wrong)}")
        raise ConversionError("HF checkpoint does not match its config.json / the Qwen3 layout: " + "; ".join(msg))

    g, hd = d["num_query_groups"], d["kv_channels"]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out["embedding.word_embeddings.weight"] = _pad_rows(sd["model.embed_tokens.weight"], padded_vocab, tokenizer_vocab)
    for i in range(d["num_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = qkv_to_megatron(
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"], g, hd)
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not d["tie_embeddings"]:
        out["output_layer.weight"] = _pad_rows(sd["lm_head.weight"], padded_vocab, tokenizer_vocab)
    return out


def megatron_to_hf_tensors(msd: dict[str, torch.Tensor], model_cfg, vocab_size: int,
                           dtype: Optional[torch.dtype] = None) -> "OrderedDict[str, torch.Tensor]":
    """Full Megatron tensors (TP=1 names) -> HF Qwen3 tensors; the vocabulary is cut to ``vocab_size``."""
    m = model_cfg
    sd = {k: v for k, v in msd.items() if not k.endswith("_extra_state")}
    if m.tie_embeddings:
        sd.pop("output_layer.weight", None)  # PP>1 last stages hold a copy of the embedding
    used = set()

    def take(k):
        if k not in sd:
            raise ConversionError(f"Megatron checkpoint lacks {k}")
        used.add(k)
        return sd[k]

    def cast(t):
        t = t.detach().to("cpu")
        return (t.to(dtype) if dtype is not None else t).clone().contiguous()

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    emb = take("embedding.word_embeddings.weight")
    # fewer rows than vocab_size: rows past the tokenizer were cut at import; they come back as zeros
    out["model.embed_tokens.weight"] = cast(_pad_rows(emb[:vocab_size], vocab_size))
    for i in range(m.num_layers):
        p, q = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = cast(take(q + "input_layernorm.weight"))
        wq, wk, wv = qkv_from_megatron(take(q + "self_attention.linear_qkv.weight"), m.num_attention_heads,
                                       m.num_query_groups, m.kv_channels)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = cast(wq), cast(wk)
        out[p + "self_attn.v_proj.weight"] = cast(wv)
        out[p + "self_attn.o_proj.weight"] = cast(take(q + "self_attention.linear_proj.weight"))
        out[p + "self_attn.q_norm.weight"] = cast(take(q + "self_attention.q_layernorm.weight"))
        out[p + "self_attn.k_norm.weight"] = cast(take(q + "self_attention.k_layernorm.weight"))
        out[p + "post_attention_layernorm.weight"] = cast(take(q + "pre_mlp_layernorm.weight"))
        gate, up = take(q + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = cast(gate), cast(up)
        out[p + "mlp.down_proj.weight"] = cast(take(q + "mlp.linear_fc2.weight"))
    out["model.norm.weight"] = cast(take("decoder.final_layernorm.weight"))
    if not m.tie_embeddings:
        out["lm_head.weight"] = cast(_pad_rows(take("output_layer.weight")[:vocab_size], vocab_size))
    left = sorted(set(sd) - used)
    if left:
        raise ConversionError(f"Megatron tensors with no HF counterpart: {_short(left)}")
    return out


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------
# Megatron side: assign full tensors to a (TP/PP-sharded) model
# --------------------------------------------------------------------------------------------------

def _tp_slice(name: str, param: torch.Tensor, full: torch.Tensor, gated: bool) -> torch.Tensor:
    """This TP rank's shard of a full tensor (the inverse of the TP gather in tests/workers)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    r, dim = parallel_state.get_tensor_model_parallel_rank(), param.partition_dim
    if name.endswith("mlp.linear_fc1.weight") and gated:
        if full.shape[0] % (2 * tp):
            raise ConversionError(f"{name}: {tuple(full.shape)} does not split into gate/up halves over TP={tp}")
        gate, up = full.chunk(2, dim=0)  # SwiGLU: each rank holds [gate_r; up_r]
        return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)
    if full.shape[dim] % tp:
        raise ConversionError(f"{name}: dimension {dim} of {tuple(full.shape)} does not split over TP={tp}")
    return full.chunk(tp, dim=dim)[r]


def _global_name(name: str, layer_numbers: dict[int, int]) -> str:
    """Local (per-PP-stage) state-dict name -> global (TP=1 PP=1) name."""
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{layer_numbers[int(local)]}.{rest}"
    return name


def assign_full_state_dict(model, full: dict[str, torch.Tensor], *, tied: bool) -> None:
    """Load full (TP=1, global-layer) Megatron tensors into ``model`` (any TP/PP). Collective.

    Every model parameter must be assigned with its exact shape, and every full tensor must be used by
    some rank (PP stages hold different layers); otherwise ConversionError names the keys.
    """
    import torch.distributed as dist

    params = dict(model.named_parameters())
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    own = model.state_dict()
    new, missing, wrong, used = {}, [], [], set()
    for name, cur in own.items():
        if name.endswith("_extra_state"):
            new[name] = cur
            continue
        g = _global_name(name, layer_numbers)
        if g == "output_layer.weight" and tied:  # the last PP stage's copy of the tied embedding
            g = "embedding.word_embeddings.weight"
        if g not in full:
            missing.append(name)
            continue
        t = _tp_slice(name, params.get(name, cur), full[g], model.config.gated_linear_unit)
        if tuple(t.shape) != tuple(cur.shape):
            wrong.append(f"{name}: model {tuple(cur.shape)} vs converted {tuple(t.shape)} (full {tuple(full[g].shape)})")
            continue
        new[name] = t
        used.add(g)
    if missing or wrong:
        raise ConversionError("cannot load the converted weights into the model: "
                              + (f"unassigned parameters {_short(missing)}; " if missing else "")
                              + (f"shape mismatch {_short(wrong)}" if wrong else ""))
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [used]
    if dist.is_initialized():
        dist.all_gather_object(everyone, sorted(used))
    unused = sorted(set(full) - set().union(*map(set, everyone)))
    if unused:
        raise ConversionError(f"converted tensors no model parameter took: {_short(unused)}")
    model.load_state_dict(new, strict=True)


def load_hf_into_model(model, src: str | Path, cfg, tokenizer_vocab: Optional[int] = None) -> dict:
    """``checkpoint.init_from=hf:PATH``: load HF Qwen3 weights into an already built (sharded) model.

    ``tokenizer_vocab``: the data tokenizer's size; lets a checkpoint with more (padding) rows than the
    model's padded vocabulary load when the rows cut off are beyond every token id. Returns the HF config.
    """
    hf = read_hf_config(src)
    check_hf_config(hf)
    check_model_matches_hf(cfg.model, hf)
    if tokenizer_vocab is not None and tokenizer_vocab > hf["vocab_size"]:  # before reading any weights
        raise ConversionError(f"the data tokenizer has {tokenizer_vocab} entries but the HF checkpoint's vocabulary "
                              f"only {hf['vocab_size']}: use the checkpoint's tokenizer (data.tokenizer=<HF dir>)")
    full = hf_to_megatron_tensors(load_hf_state_dict(src), hf, model.vocab_size, tokenizer_vocab)
    assign_full_state_dict(model, full, tied=cfg.model.tie_embeddings)
    return hf

