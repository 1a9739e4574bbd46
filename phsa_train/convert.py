"""Hugging Face Qwen3 <-> Megatron-Core checkpoint conversion.

Commands (see ``python -m phsa_train.convert --help`` and docs/convert.md)::

    python -m phsa_train.convert hf-to-megatron SRC_HF_DIR DST_CKPT_DIR [hydra overrides]
    python -m phsa_train.convert megatron-to-hf SRC_CKPT_DIR DST_HF_DIR [--vocab-size N] [--dtype ...]

and, inside training, ``checkpoint.init_from=hf:PATH`` (:func:`phsa_train.training.hf_qwen3.load_hf_into_model`).

How it works
------------
* ``hf-to-megatron`` runs on **one process**: it builds our GPTModel at TP=PP=1, assigns the converted
  weights and writes a Megatron-Core ``dist_checkpointing`` (torch_dist) checkpoint in our layout
  (``DST/iter_0000000/`` + ``meta.json`` + ``latest_checkpointed_iteration.txt``). torch_dist stores
  every tensor with its global shape and reshards at load time, so the result loads under any TP/PP
  layout (``checkpoint.init_from=DST``). The only layout-dependent thing is the vocabulary padding
  (``model.make_vocab_size_divisible_by x TP`` rows, Megatron's rule): pass the TP you will train with
  (``parallel.tensor_model_parallel_size=N``) so the padded row count matches; zero rows are appended.
* ``megatron-to-hf`` loads any of our checkpoints (converted or trained, any TP/PP it was saved with)
  into a TP=1 model on one process, unpads the vocabulary and writes ``config.json`` +
  ``model.safetensors`` (+ the tokenizer files copied at import).
* The name/layout mapping and its strictness are in :mod:`phsa_train.training.hf_qwen3`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from phsa_train.training.hf_qwen3 import (DTYPES, HF_ASSET_SUFFIXES, HF_ASSETS_DIR, HF_DTYPE_NAMES, ConversionError,
                                          assign_full_state_dict, check_hf_config, check_model_matches_hf,
                                          hf_model_overrides, hf_to_megatron_tensors, load_hf_state_dict,
                                          megatron_to_hf_tensors, read_hf_config)

CONVERTED_STEP = 0

# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

def _single_process_setup() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from phsa_train import compat
    from phsa_train.training.distributed import init_distributed, init_model_parallel

    env = init_distributed()
    if env.world_size != 1:
        raise ConversionError("run the conversion on one process (no torchrun): the checkpoint it writes is "
                              "resharded to any TP/PP layout at load time")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed failed to initialise")
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(1, 1, 1)
    compat.apply(on_gpu=False)  # the conversion builds and saves the model on the CPU


def _build_single(cfg, vocab: int, dtype: torch.dtype):
    """Our GPTModel at TP=PP=CP=1 (whatever the config says), weights uninitialised."""
    from omegaconf import OmegaConf

    from phsa_train.megatron.model import build_model

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    c.parallel.tensor_model_parallel_size = c.parallel.pipeline_model_parallel_size = 1
    c.parallel.context_parallel_size = 1
    c.train.recompute = "none"
    model = build_model(c, vocab, dtype, init_weights=False)
    return model.cpu() if next(model.parameters()).is_cuda else model


def _compose_for_hf(hf: dict, overrides: list[str], name: str):
    from phsa_train.config import compose

    # model=<preset> given: the preset is checked against the checkpoint; otherwise the checkpoint fills cfg.model
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides)
    cfg = compose(overrides if explicit else ["model=tiny", *hf_model_overrides(hf, name), *overrides])
    check_model_matches_hf(cfg.model, hf)
    return cfg


def hf_to_megatron(src: str | Path, dst: str | Path, overrides: list[str] = (), dtype: str = "source") -> Path:
    """Convert a HF Qwen3 directory into our Megatron distributed checkpoint under ``dst``."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from phsa_train.megatron.model import padded_vocab_size
    from phsa_train.training import checkpoint as ckpt

    src, dst = Path(src), Path(dst)
    if ckpt.iter_dir(dst, CONVERTED_STEP).exists():
        raise FileExistsError(f"{ckpt.iter_dir(dst, CONVERTED_STEP)} exists; choose an empty destination")
    hf = read_hf_config(src)
    check_hf_config(hf)
    cfg = _compose_for_hf(hf, list(overrides), re.sub(r"[^a-z0-9_.-]", "_", src.resolve().name.lower()))
    hf_sd = load_hf_state_dict(src)
    src_dtype = hf_sd["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in hf_sd else torch.float32
    params_dtype = src_dtype if dtype == "source" else DTYPES[dtype]
    tp = cfg.parallel.tensor_model_parallel_size
    # Training pads the *tokenizer's* vocabulary (phsa_train.training.data.build_data), so when we know the tokenizer
    # (data.tokenizer=..., else the tokenizer.json shipped in SRC) the rows are padded_vocab(tokenizer);
    # rows past every token id (Qwen3: 151669 ids, 151936 rows) may then be cut.
    tok_spec = cfg.data.tokenizer or (str(src) if (src / "tokenizer.json").exists() else None)
    tokenizer_vocab = None
    if tok_spec:
        from phsa_train.data import load_tokenizer

        tokenizer_vocab = load_tokenizer(tok_spec).get_vocab_size(with_added_tokens=True)
    padded = padded_vocab_size(tokenizer_vocab or hf["vocab_size"], cfg.model.make_vocab_size_divisible_by, tp)
    full = hf_to_megatron_tensors(hf_sd, hf, padded, tokenizer_vocab)
    del hf_sd

    _single_process_setup()
    model = _build_single(cfg, padded, params_dtype)
    assign_full_state_dict(model, full, tied=cfg.model.tie_embeddings)
    del full

    extra = {"converted_from_hf": str(src.resolve()), "hf_config": hf, "hf_vocab_size": hf["vocab_size"],
             "tokenizer": tok_spec, "tokenizer_vocab_size": tokenizer_vocab,
             "padded_vocab_size": padded, "padded_for_tp": tp, "hf_dtype": str(src_dtype).split(".")[-1]}

    def copy_assets(tmp: Path) -> None:
        assets = [p for p in src.iterdir() if p.is_file() and p.suffix in HF_ASSET_SUFFIXES
                  and p.name not in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")]
        if assets:
            (tmp / HF_ASSETS_DIR).mkdir()
            for p in assets:
                shutil.copy2(p, tmp / HF_ASSETS_DIR / p.name)

    it = ckpt.save_weights_only(dst, CONVERTED_STEP, model, OmegaConf.to_container(cfg, resolve=True), extra,
                                add_files=copy_assets)
    dist.barrier()
    return it


def megatron_to_hf(src: str | Path, dst: str | Path, overrides: list[str] = (), vocab_size: Optional[int] = None,
                   dtype: str = "auto", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export one of our checkpoints (any TP/PP it was written with) to a HF Qwen3 directory."""
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from phsa_train.training import checkpoint as ckpt

    it = ckpt.resolve_iter_dir(src)
    meta = ckpt.read_meta(it)
    cfg = OmegaConf.create(meta["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    extra = meta.get("extra", {})
    _single_process_setup()
    tensors_md = dist_checkpointing.load_tensors_metadata(str(it))
    emb_md = tensors_md["embedding.word_embeddings.weight"]
    padded = emb_md.global_shape[0]
    vocab = vocab_size or extra.get("hf_vocab_size") or cfg.model.vocab_size or padded
    out_dtype = (DTYPES[dtype] if dtype != "auto" else
                 getattr(torch, extra["hf_dtype"]) if "hf_dtype" in extra else emb_md.dtype)
    model = _build_single(cfg, padded, emb_md.dtype)
    ckpt.load(it.parent, meta["step"], model)
    hf_sd = megatron_to_hf_tensors(model.state_dict(), cfg.model, vocab, out_dtype)
    del model

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (it / HF_ASSETS_DIR).is_dir():
        for p in (it / HF_ASSETS_DIR).iterdir():
            shutil.copy2(p, dst / p.name)
    hf = hf_config_for(cfg.model, vocab, out_dtype, extra.get("hf_config"))
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _save_safetensors(hf_sd, dst, max_shard_bytes)
    return dst


def hf_config_for(m, vocab: int, dtype: torch.dtype, base: Optional[dict] = None) -> dict:
    """A Qwen3 config.json for ``cfg.model`` (on top of the imported one, keeping its token ids etc.)."""
    hf = dict(base) if base else {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": m.init_method_std,
        "max_position_embeddings": m.max_position_embeddings, "use_sliding_window": False, "use_cache": True,
        "rope_scaling": None}
    hf.update({"hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
               "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
               "num_key_value_heads": m.num_query_groups, "head_dim": m.kv_channels,
               "rms_norm_eps": m.layernorm_epsilon, "tie_word_embeddings": bool(m.tie_embeddings),
               "vocab_size": vocab})
    if isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": m.rotary_base}
    else:
        hf["rope_theta"] = m.rotary_base
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = HF_DTYPE_NAMES[dtype]
    return hf


def _save_safetensors(sd: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= max_shard_bytes:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  # HF Qwen3 -> Megatron checkpoint; cfg.model is filled from config.json (or checked against model=<preset>)
  python -m phsa_train.convert hf-to-megatron ~/hf/Qwen3-0.6B ckpt/qwen3_0.6b
  python -m phsa_train.convert hf-to-megatron ~/hf/Qwen3-0.6B ckpt/qwen3_0.6b_tp2 \\
      model=qwen3_0.6b parallel.tensor_model_parallel_size=2
  # then train from it (any TP/PP; the TP given above only sets the vocabulary padding):
  python -m phsa_train.train model=qwen3_0.6b attention=phsa checkpoint.init_from=ckpt/qwen3_0.6b_tp2 ...
  # or convert on the fly (weights only): checkpoint.init_from=hf:~/hf/Qwen3-0.6B
  # Megatron checkpoint (converted or trained; a root with iter_* dirs or one iter dir) -> HF
  python -m phsa_train.convert megatron-to-hf runs/x/checkpoints hf_out/

Run on one process (not under torchrun). Errors (unsupported architecture, config/shape mismatch,
unconsumed or unassigned tensors) exit with status 2 and one line naming the keys.
"""


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phsa_train.convert", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="HF Qwen3 directory -> Megatron-Core distributed checkpoint (any TP/PP at load)",
                       description="Convert a Hugging Face Qwen3 (dense) directory into a Megatron-Core "
                                   "dist_checkpointing checkpoint in phsa_train's layout (DST/iter_0000000).",
                       epilog=EPILOG)
    a.add_argument("src", help="HF model directory (config.json + *.safetensors)")
    a.add_argument("dst", help="output checkpoint root (use it as checkpoint.init_from)")
    a.add_argument("overrides", nargs="*",
                   help="Hydra overrides of the training config, e.g. model=qwen3_0.6b "
                        "parallel.tensor_model_parallel_size=2 (sets the vocabulary padding)")
    a.add_argument("--dtype", choices=["source", *DTYPES], default="source",
                   help="dtype stored in the checkpoint (default: the HF tensors'; loads cast to the model's)")
    b = sub.add_parser("megatron-to-hf", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="Megatron checkpoint (converted or trained) -> HF Qwen3 directory",
                       description="Export one of phsa_train's checkpoints to a Hugging Face Qwen3 directory "
                                   "(config.json + model.safetensors + the tokenizer files saved at import).",
                       epilog=EPILOG)
    b.add_argument("src", help="checkpoint root (latest iter_* is used) or one iter_XXXXXXX directory")
    b.add_argument("dst", help="output HF directory")
    b.add_argument("overrides", nargs="*", help="dotlist fixes of the saved config (rarely needed)")
    b.add_argument("--vocab-size", type=int, default=None,
                   help="rows to keep (default: the imported HF vocab_size, else model.vocab_size, else all)")
    b.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of the exported tensors (default: the imported HF dtype, else the checkpoint's)")
    args = ap.parse_args(argv)

    from phsa_train.config import ConfigError

    try:
        if args.cmd == "hf-to-megatron":
            out = hf_to_megatron(args.src, args.dst, args.overrides, args.dtype)
        else:
            out = megatron_to_hf(args.src, args.dst, args.overrides, args.vocab_size, args.dtype)
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from phsa_train.training.distributed import shutdown

        shutdown()
    print(f"[phsa_train.convert] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

