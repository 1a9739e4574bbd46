"""HF Qwen3 <-> Megatron-Core conversion (phsa_train.convert) on tiny random checkpoints written locally.

One module-scoped fixture runs the expensive part once, with the real CLI and real processes:
``hf-to-megatron`` (tied: padded for TP=2; untied: TP=1), the logits worker at TP=1 (one process) and
TP=2 (torchrun, 2 gloo ranks), and ``megatron-to-hf`` of a converted and of a TP=2-written checkpoint.
The tests then compare against ``transformers`` in this process. fp32 throughout.
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from phsa_train import convert  # noqa: E402
from phsa_train.training import hf_qwen3  # noqa: E402
from phsa_train.training.metrics import read_metrics  # noqa: E402
from tests.helpers import REPO, free_port, subprocess_env  # noqa: E402

# Measured on CPU fp32 (2 cores): max |Megatron - transformers| ~ 1e-6 on logits of std ~ 2.
LOGITS_ATOL, LOGITS_RTOL = 1e-4, 1e-4
VOCAB = 4000  # not a multiple of 128: exercises the vocabulary padding (4000 -> 4096 rows)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=512)


def write_tiny_qwen3(path: Path, *, tied: bool, vocab: int = VOCAB, seed: int = 0, std: float = 0.1) -> Path:
    """A random tiny Qwen3 saved with save_pretrained; norm weights randomised too (default init is all ones)."""
    cfg = transformers.Qwen3Config(vocab_size=vocab, tie_word_embeddings=tied, **TINY)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else std * torch.randn_like(p))
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"note": "asset copied through the conversion"}\n')
    return path


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phsa_train.convert", *map(str, args)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(*procs, timeout=300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{p.args}:\n{out[-6000:]}"
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    hf = {"tied": write_tiny_qwen3(tmp / "hf_tied", tied=True), "untied": write_tiny_qwen3(tmp / "hf_untied", tied=False, seed=1)}
    mg = {k: tmp / f"mg_{k}" for k in hf}
    wait_all(cli("hf-to-megatron", hf["tied"], mg["tied"], "parallel.tensor_model_parallel_size=2"),
             cli("hf-to-megatron", hf["untied"], mg["untied"]))

    cases = [a for k in hf for a in ("--case", k, str(hf[k]), str(mg[k]))]
    out = {1: tmp / "tp1.pt", 2: tmp / "tp2.pt"}
    tp2_ckpt = tmp / "tp2_ckpt"
    worker = str(REPO / "tests" / "workers" / "convert_tp.py")
    env = subprocess_env()
    p1 = subprocess.Popen([sys.executable, worker, "--out", str(out[1]), "--tp", "1", *cases], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", "--master-addr=127.0.0.1", worker, "--out", str(out[2]),
                           "--tp", "2", *cases, "--save-case", "untied", "--save-dir", str(tp2_ckpt)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_all(p1, p2)

    back = {"tied": tmp / "back_tied", "untied": tmp / "back_untied_from_tp2"}
    wait_all(cli("megatron-to-hf", mg["tied"], back["tied"]), cli("megatron-to-hf", tp2_ckpt, back["untied"]))
    return {"hf": hf, "mg": mg, "back": back, "tp": {tp: torch.load(p) for tp, p in out.items()}, "tmp": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tied", "untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_imported_logits_match_transformers(run, case, tp):
    res = run["tp"][tp][case]
    ref = hf_logits(run["hf"][case], res["tokens"])
    assert ref.shape == res["mg"].shape == (2, 64, VOCAB)
    for path in ("mg", "hf"):  # the converted dist checkpoint (resharded to tp) and the direct hf: load
        err = (res[path] - ref).abs().max().item()
        print(f"tp={tp} {case} {path}: max|diff| = {err:.2e} (logit std {ref.std():.2f})")
        torch.testing.assert_close(res[path], ref, atol=LOGITS_ATOL, rtol=LOGITS_RTOL, msg=f"{case} tp{tp} {path}")
    # both import routes assign exactly the same tensors
    torch.testing.assert_close(res["mg"], res["hf"], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_phsa_with_every_block_selected_equals_dense(run, tp):
    for case in ("tied", "untied"):
        res = run["tp"][tp][case]
        err = (res["phsa"] - res["hf"]).abs().max().item()
        print(f"tp={tp} {case}: PHSA(top-k = all blocks) vs dense max|diff| = {err:.2e}")
        torch.testing.assert_close(res["phsa"], res["hf"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tied", "untied"])
def test_export_round_trips_bit_for_bit(run, case):
    """tied: HF -> (CLI, TP=1 process, padded for TP=2) -> HF; untied: HF -> hf: load at TP=2 -> checkpoint
    written by 2 ranks -> HF."""
    src, back = run["hf"][case], run["back"][case]
    a = safetensors_torch.load_file(str(src / "model.safetensors"))
    b = safetensors_torch.load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "model_type"):
        assert ca[k] == cb[k], k
    assert hf_qwen3.hf_rope_theta(ca) == hf_qwen3.hf_rope_theta(cb)
    if case == "tied":  # assets saved at import come back
        assert (back / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(src, tokens), hf_logits(back, tokens))  # transformers loads the export


def test_converted_checkpoint_layout(run):
    it = run["mg"]["tied"] / "iter_0000000"
    assert (run["mg"]["tied"] / "latest_checkpointed_iteration.txt").read_text() == "0"
    meta = json.loads((it / "meta.json").read_text())
    assert meta["extra"]["padded_vocab_size"] == 4096 and meta["extra"]["padded_for_tp"] == 2
    assert meta["config"]["model"]["layernorm_epsilon"] == 1e-6 and meta["config"]["model"]["tie_embeddings"] is True


# Public config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-8B (architecture fields; legacy top-level rope_theta).
QWEN3_PUBLIC = {
    "qwen3_0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_window_layers=28),
    "qwen3_8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_window_layers=36),
}


@pytest.mark.parametrize("preset", sorted(QWEN3_PUBLIC))
def test_presets_match_the_public_qwen3_configs(preset):
    from tests.helpers import compose

    hf = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "hidden_act": "silu",
          "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
          "sliding_window": None, "use_sliding_window": False, "vocab_size": 151936, "torch_dtype": "bfloat16",
          **QWEN3_PUBLIC[preset]}
    hf_qwen3.check_hf_config(hf)
    hf_qwen3.check_model_matches_hf(compose([f"model={preset}"]).model, hf)  # raises on any difference
    with pytest.raises(hf_qwen3.ConversionError, match="model.layernorm_epsilon=1e-05 but the checkpoint has 1e-06"):
        hf_qwen3.check_model_matches_hf(compose([f"model={preset}", "model.layernorm_epsilon=1e-5"]).model, hf)


# ------------------------------------------------------------------------------------------- bad input

def _variant(tmp_path, src: Path, name: str, **config_changes) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="qwen3_moe", num_experts=8), "Mixture-of-Experts"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "no QK-norm"),
    (dict(model_type="llama"), "only model_type 'qwen3'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "RoPE scaling"),
])
def test_unsupported_architecture_is_refused(run, tmp_path, capsys, changes, message):
    src = _variant(tmp_path, run["hf"]["tied"], "bad", **changes)
    assert convert.main(["hf-to-megatron", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unsupported") and message in err, err
    assert not (tmp_path / "out").exists()


def test_config_override_that_contradicts_the_checkpoint(run, tmp_path, capsys):
    assert convert.main(["hf-to-megatron", str(run["hf"]["tied"]), str(tmp_path / "o"), "model.hidden_size=128"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size=128 but the checkpoint has 64" in err, err
    assert convert.main(["hf-to-megatron", str(run["hf"]["untied"]), str(tmp_path / "o"), "model=qwen3_0.6b"]) == 2
    err = capsys.readouterr().err
    assert "model.num_layers=28 but the checkpoint has 2" in err and "model.tie_embeddings=True" in err, err


def test_tensor_shapes_and_names_are_checked(run, tmp_path):
    from tests.helpers import compose

    hf = hf_qwen3.read_hf_config(run["hf"]["untied"])
    sd = hf_qwen3.load_hf_state_dict(run["hf"]["untied"])
    with pytest.raises(hf_qwen3.ConversionError, match=r"shape mismatch model\.layers\.0\.mlp\.gate_proj\.weight: \(96, 64\) \(config implies \(128, 64\)\)"):
        hf_qwen3.hf_to_megatron_tensors(sd, {**hf, "intermediate_size": 128}, 4096)
    extra = {**sd, "model.layers.1.self_attn.q_proj.bias": torch.zeros(128)}
    with pytest.raises(hf_qwen3.ConversionError, match=r"no Megatron counterpart model\.layers\.1\.self_attn\.q_proj\.bias"):
        hf_qwen3.hf_to_megatron_tensors(extra, hf, 4096)
    missing = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(hf_qwen3.ConversionError, match=r"missing tensors lm_head\.weight"):
        hf_qwen3.hf_to_megatron_tensors(missing, hf, 4096)
    with pytest.raises(hf_qwen3.ConversionError, match="4000 rows but the model only 2048"):
        hf_qwen3.hf_to_megatron_tensors(sd, hf, 2048)
    # rows past the tokenizer's last id may be cut (Qwen3: 151669 ids in 151936 rows), and come back as zeros
    cut = hf_qwen3.hf_to_megatron_tensors(sd, hf, 3968, tokenizer_vocab=3900)
    assert cut["embedding.word_embeddings.weight"].shape[0] == cut["output_layer.weight"].shape[0] == 3968
    back = hf_qwen3.megatron_to_hf_tensors(cut, compose(["model=tiny", *hf_qwen3.hf_model_overrides(hf)]).model, 4000)
    assert torch.equal(back["lm_head.weight"][:3968], sd["lm_head.weight"][:3968])
    assert not back["lm_head.weight"][3968:].any()
    with pytest.raises(hf_qwen3.ConversionError, match=r"4000 rows but the model only 3968 \(padded from 3990"):
        hf_qwen3.hf_to_megatron_tensors(sd, hf, 3968, tokenizer_vocab=3990)
    with pytest.raises(hf_qwen3.ConversionError, match="the data tokenizer has 4100 entries"):
        hf_qwen3.hf_to_megatron_tensors(sd, hf, 4224, tokenizer_vocab=4100)
    # a checkpoint whose tensors contradict its own config.json, through the CLI
    bad = _variant(tmp_path, run["hf"]["tied"], "bad_ffn", intermediate_size=80)
    with pytest.raises(hf_qwen3.ConversionError, match="mlp.gate_proj.weight: \\(96, 64\\) \\(config implies \\(80, 64\\)\\)"):
        convert.hf_to_megatron(bad, tmp_path / "o")


# ------------------------------------------------------------------------- checkpoint.init_from=hf:PATH

@pytest.mark.slow
def test_init_from_hf_trains_from_the_converted_weights(run, tmp_path, cache_dir):
    """The real launcher (2 gloo ranks, TP=2, embedded data whose tokenizer has 4096 entries) starts from a
    HF checkpoint with vocab 4096. lr=0: after two real optimizer steps the saved weights, exported
    back to HF, are the source's bit for bit; the step-0 loss is the imported model's (std 0.5 weights
    give a loss far above ln(4096) = 8.3, which a fresh init cannot)."""
    src = write_tiny_qwen3(tmp_path / "hf4096", tied=False, vocab=4096, seed=7, std=0.5)
    hf = hf_qwen3.read_hf_config(src)
    overrides = ["model=tiny", *hf_qwen3.hf_model_overrides(hf, "tiny_qwen3"), "parallel.tensor_model_parallel_size=2",
                 "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=2",
                 "train.lr=0", "train.min_lr=0", "train.warmup_steps=0", "train.eval_interval=2", "train.eval_iters=1",
                 "checkpoint.interval=2", f"checkpoint.init_from=hf:{src}", "logging.plots=false"]
    run_dir = tmp_path / "run"
    env = subprocess_env(PHSA_RUN_DIR=run_dir, PHSA_CACHE_DIR=cache_dir, NPROC=2, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/pretrain.sh", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    rows = read_metrics(run_dir)
    valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
    assert valid and valid[0] > math.log(4096) + 2, valid
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]

    back = tmp_path / "back"
    wait_all(cli("megatron-to-hf", run_dir / "checkpoints", back))
    a = safetensors_torch.load_file(str(src / "model.safetensors"))
    b = safetensors_torch.load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # no HF config was imported here: the exported config.json is written from cfg.model; transformers loads it
    tokens = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(src, tokens), hf_logits(back, tokens))


def test_init_from_hf_vocab_mismatch_is_a_clear_error(run):
    """The VOCAB=4000 checkpoint cannot serve a 4096-entry tokenizer (what train.py passes as tokenizer_vocab);
    refused before any weight is touched."""
    from tests.helpers import compose

    hf = hf_qwen3.read_hf_config(run["hf"]["tied"])
    cfg = compose(["model=tiny", *hf_qwen3.hf_model_overrides(hf, "x")])
    with pytest.raises(hf_qwen3.ConversionError, match="the data tokenizer has 4096 entries but the HF checkpoint's "
                                                      "vocabulary only 4000"):
        hf_qwen3.load_hf_into_model(None, run["hf"]["tied"], cfg, tokenizer_vocab=4096)
    with pytest.raises(hf_qwen3.ConversionError, match="model.num_layers=3 but the checkpoint has 2"):
        hf_qwen3.load_hf_into_model(None, run["hf"]["tied"], compose(["model=tiny", *hf_qwen3.hf_model_overrides(hf),
                                                                     "model.num_layers=3"]))
