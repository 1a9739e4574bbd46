"""Fast CPU tests of phsa_train.data and the data_prep CLI (about 30 s on 2 cores)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from phsa_train import data as D

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CJK_TEXT = "我们今天去公园，天气很好。你来吗？来吧！“好的”，他说：（是的）《书》、【注】……" * 40


@pytest.fixture(scope="session")
def default_data(tmp_path_factory) -> D.PreparedData:
    cache = tmp_path_factory.mktemp("default_cache")
    t0 = time.perf_counter()
    prepared = D.prepare_default_corpus(cache)
    print(f"prepare_default_corpus: {time.perf_counter() - t0:.1f} s")
    return prepared


@pytest.fixture(scope="session")
def tok(default_data) -> D.MegatronTokenizer:
    return D.MegatronTokenizer(default_data.tokenizer_path)


def test_corpus_is_real_prose(default_data):
    docs, summary = D.load_embedded_corpus()
    assert summary.chars > 1_000_000 and summary.docs > 1000
    assert summary.sha256 == default_data.manifest["corpus"]["sha256"], "corpus must be deterministic"
    text = "\n".join(docs)
    assert len(set(docs)) == len(docs) and min(map(len, docs)) >= 64
    letters = sum(c.isalpha() for c in text) / len(text)
    periods = text.count(". ") / len(text.split())  # sentence ends per word
    assert letters > 0.6, letters
    assert 0.02 < periods < 0.2, periods  # English prose: roughly one sentence per 8-30 words
    assert text.count(", ") > 5000 and "the " in text


def test_tokenizer_train_and_adapter(tmp_path, tok):
    texts = ["Hello, world. This is a test!", "Another document; with punctuation?"] * 50
    hf = D.train_bpe_tokenizer(texts, 300)
    m = D.MegatronTokenizer(hf)
    assert (m.eod, m.pad, m.vocab_size) == (0, 1, hf.get_vocab_size())
    assert m.detokenize(m.tokenize(texts[0])) == texts[0]
    assert m.detokenize([m.eod]) == "<eod>"
    hf.save(str(tmp_path / "tokenizer.json"))
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        assert D.MegatronTokenizer(spec).sha256 == m.sha256  # stable across save/load
    assert m.unique_identifiers["tokenizer_sha256"] == m.sha256
    assert D.tokenizer_sha256(D.train_bpe_tokenizer(texts, 300)) == m.sha256  # training is deterministic
    assert tok.vocab_size == 4096 and tok.eod == 0 and tok.pad == 1


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*no tokenizer.json"):
        D.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*no such file"):
        D.load_tokenizer(tmp_path / "missing.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty hub cache
    with pytest.raises(ValueError, match=r"data\.tokenizer=gpt2: not found locally and no network; allowed:"):
        D.load_tokenizer("gpt2")


def test_punct_table_default(tok, default_data):
    with open(default_data.punct_path) as f:
        table = json.load(f)
    assert table["tokenizer_sha256"] == tok.sha256 and table["charset"] == "en"
    ids = set(table["ids"])
    for p in (".", ",", "?", "!", ";", ":", "(", ")"):
        assert tok.tokenizer.token_to_id(p) in ids, p
    for i in ids:
        s = tok.detokenize([i])
        assert s.strip() and not any(c.isalnum() for c in s) and "\ufffd" not in s, repr(s)
    assert tok.eod not in ids and tok.pad not in ids
    assert tok.tokenizer.token_to_id("the") not in ids
    nl = D.build_punct_table(tok, "en", include_newline=True)
    assert set(nl["ids"]) > ids and any(tok.detokenize([i]) == "\n" for i in nl["ids"])
    with pytest.raises(ValueError, match=r"punct\.charset='fr'.*allowed: \['en', 'en_zh'\]"):
        D.build_punct_table(tok, "fr")


def test_punct_en_zh():
    hf = D.train_bpe_tokenizer([CJK_TEXT, "Plain English, with commas. And periods."] * 20, 400)
    zh_ids = hf.encode("。").ids  # token_to_id would need the byte-level alias "ãĢĤ"
    assert len(zh_ids) == 1, "training text repeats 。 so BPE must learn it as one token"
    zh_id = zh_ids[0]
    en, en_zh = D.build_punct_table(hf, "en"), D.build_punct_table(hf, "en_zh")
    assert zh_id in en_zh["ids"] and zh_id not in en["ids"]
    assert set(en["ids"]) < set(en_zh["ids"]) and hf.token_to_id(".") in en["ids"]


def test_punct_mask_and_hash_mismatch(tmp_path, tok):
    table = D.build_punct_table(tok)
    path = D.write_punct_table(table, tmp_path / "t", tok)
    assert path.endswith("t_punct.json") and (tmp_path / "t_punct.tsv").read_text().startswith("id\ttoken\n")
    mask = D.load_punct_mask(path, tok, 4096 + 128)
    assert mask.dtype == torch.bool and mask.shape == (4224,)
    assert mask.sum().item() == len(table["ids"]) and not mask[4096:].any()
    other = D.MegatronTokenizer(D.train_bpe_tokenizer(["Other text, other vocab."] * 10, 280))
    with pytest.raises(ValueError, match=r"data\.punct_table=.*sha256"):
        D.load_punct_mask(path, other, 384)
    with pytest.raises(FileNotFoundError, match=r"data\.punct_table"):
        D.load_punct_mask(tmp_path / "nope.json", tok, 4096)


def _write_inputs(tmp_path):
    txt = ["First file. It has two sentences!", "Second file:\n\nwith a blank line, and (parens)."]
    rows = ["JSON doc one, here.", "JSON doc two: there?"]
    paths = []
    for i, t in enumerate(txt):
        paths.append(tmp_path / f"f{i}.txt")
        paths[-1].write_text(t + "\n")
    paths.append(tmp_path / "rows.jsonl")
    paths[-1].write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)) + "\n")
    return paths, txt + rows


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
def test_prepare_roundtrip(tmp_path, tok, workers):
    paths, expected = _write_inputs(tmp_path)
    r = D.prepare(paths, tmp_path / "out" / "ds", tok, workers=workers, progress=False)
    assert (r.docs, os.path.exists(r.punct_path)) == (4, True)
    ds = IndexedDataset(r.prefix)
    assert len(ds) == 4 and ds[0].dtype == np.uint16 and int(ds.sequence_lengths.sum()) == r.tokens
    for i, text in enumerate(expected):
        assert ds[i][-1] == tok.eod and (ds[i][:-1] != tok.eod).all()
        assert tok.detokenize(ds[i][:-1]) == text
    para = D.prepare(paths[1:2], tmp_path / "para", tok, split_docs="paragraph", progress=False)
    assert para.docs == 2
    with pytest.raises(FileNotFoundError, match="data.inputs"):
        D.prepare([tmp_path / "missing.txt"], tmp_path / "x", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text key"}\n')
    with pytest.raises(ValueError, match="json-key 'text'"):
        D.prepare([bad], tmp_path / "bad", tok, progress=False)
    assert not any(p.name.startswith("bad.tmp") for p in tmp_path.iterdir()), "failed run must clean its temp files"


def test_build_gpt_datasets(tmp_path, tok, default_data):
    seq = 128
    train, valid = D.build_gpt_datasets(
        [default_data.prefix], tokenizer=tok, seq_len=seq, seed=1234, num_samples=(64, 8), cache_dir=str(tmp_path)
    )
    assert len(train) >= 64 and len(valid) >= 8
    s = train[0]
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        assert s[k].shape == (seq,), k
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])
    assert int(s["tokens"].max()) < tok.vocab_size
    docmask, _ = D.build_gpt_datasets([default_data.prefix], tokenizer=tok, seq_len=seq, seed=1234,
                                      num_samples=(8, 8), cache_dir=str(tmp_path), reset_attention_mask=True)
    assert docmask[0]["attention_mask"].shape == (1, seq, seq)
    with pytest.raises(FileNotFoundError, match=r"data\.prefixes: .*nope"):
        D.build_gpt_datasets([str(tmp_path / "nope")], tokenizer=tok, seq_len=seq, seed=1, num_samples=(1, 1),
                             cache_dir=str(tmp_path))
    assert D.check_vocab(default_data.prefix, tok.vocab_size) < tok.vocab_size
    with pytest.raises(ValueError, match=r"data\.tokenizer has vocab_size 300"):
        D.check_vocab(default_data.prefix, 300)


def _cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_cli(tmp_path):
    h = _cli("--help")
    assert h.returncode == 0 and "--output-prefix" in h.stdout and "punct" in h.stdout
    paths, _ = _write_inputs(tmp_path)
    out = tmp_path / "cli" / "ds"
    r = _cli("--input", *paths, "--output-prefix", out, "--tokenizer", "train", "--vocab-size", 300, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert IndexedDataset.exists(str(out)) and (tmp_path / "cli" / "ds_tokenizer.json").exists()
    p = _cli("punct", "--tokenizer", tmp_path / "cli" / "ds_tokenizer.json", "--output-prefix", tmp_path / "p",
             "--punct-charset", "en_zh")
    assert p.returncode == 0 and (tmp_path / "p_punct.json").exists(), p.stderr
    bad = _cli("--input", tmp_path / "missing.txt", "--output-prefix", out, "--tokenizer", "train")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing.txt" in bad.stderr
    usage = _cli("--input", paths[0])
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_default_corpus_idempotent_and_atomic(tmp_path, default_data, monkeypatch):
    # Idempotent: a complete cache is returned without rebuilding.
    cache = os.path.dirname(os.path.dirname(default_data.prefix))
    t0 = time.perf_counter()
    again = D.prepare_default_corpus(cache)
    assert again == default_data and time.perf_counter() - t0 < 0.5
    # Atomic: a crash mid-build leaves neither a final dir nor a temp dir behind.
    P = sys.modules["phsa_train.data.prepare"]  # `phsa_train.data.prepare` the attribute is the function

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(P, "write_documents", crash)
    with pytest.raises(KeyboardInterrupt):
        D.prepare_default_corpus(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # A temp dir left by a SIGKILLed build (dead pid on this host) and a half-written final dir are cleaned up.
    name = os.path.basename(os.path.dirname(default_data.prefix))
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    stale = tmp_path / f".tmp-{name}-{socket.gethostname()}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "corpus.bin").write_bytes(b"\0" * 10)
    (tmp_path / name).mkdir()
    (tmp_path / name / "corpus.bin").write_bytes(b"half")
    fresh = D.prepare_default_corpus(tmp_path)
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == [name]
    assert fresh.manifest["corpus"] == default_data.manifest["corpus"]
    assert fresh.manifest["tokenizer_sha256"] == default_data.manifest["tokenizer_sha256"]
    assert re.fullmatch(r"embedded-py\d+\.\d+\.\d+-v4096-f\d+", name)


# ------------------------------------------------------------------ data_prep: bad input is one line naming the file


def _data_prep(argv, capsys) -> tuple[int, str]:
    from data_prep.__main__ import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_data_prep_non_string_json_value_names_the_line(tmp_path, default_data, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"text": "fine."}\n{"text": 5}\n')
    rc, err = _data_prep(["--input", src, "--tokenizer", default_data.tokenizer_path, "--output-prefix",
                          tmp_path / "out", "--no-progress"], capsys)
    assert rc == 2 and err == f"python -m data_prep: error: {src}:2: the value under --json-key 'text' is int, not a string"


def test_data_prep_gz_that_is_not_gzip_names_the_file(tmp_path, default_data, capsys):
    src = tmp_path / "plain.txt.gz"
    src.write_text("plain text, not gzip.")
    rc, err = _data_prep(["--input", src, "--tokenizer", default_data.tokenizer_path, "--output-prefix",
                          tmp_path / "out", "--no-progress"], capsys)
    assert rc == 2 and err.startswith(f"python -m data_prep: error: {src}: not a readable gzip file (") and "\n" not in err
    assert not list(tmp_path.glob("out*")), "nothing half-written is left"


def test_data_prep_invalid_utf8_names_the_file(tmp_path, default_data, capsys):
    src = tmp_path / "latin1.txt"
    src.write_bytes("caf\u00e9, cr\u00e8me.".encode("latin-1"))
    rc, err = _data_prep(["--input", src, "--tokenizer", "train", "--output-prefix", tmp_path / "out",
                          "--no-progress"], capsys)
    assert rc == 2 and err.startswith(f"python -m data_prep: error: {src}: not valid UTF-8 text (") and "\n" not in err


def test_data_prep_read_only_output_dir_fails_before_training_a_tokenizer(tmp_path, capsys, monkeypatch):
    import tempfile

    src = tmp_path / "a.txt"
    src.write_text("Some text, with punctuation. " * 50)
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    if os.access(out_dir, os.W_OK):  # root ignores permission bits: make the directory refuse new files
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", os.path.join(dir, "x"))
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    trained = []
    monkeypatch.setattr(D, "train_bpe_tokenizer", lambda *a, **k: trained.append(1))
    rc, err = _data_prep(["--input", src, "--tokenizer", "train", "--output-prefix", out_dir / "corpus"], capsys)
    assert rc == 2 and err == (f"python -m data_prep: error: --output-prefix {out_dir}/corpus: cannot write to "
                               f"{out_dir} (Permission denied)")
    assert not trained and not list(out_dir.iterdir())


def test_orphan_tmp_files_of_dead_writers_are_removed(tmp_path, default_data):
    from phsa_train.data.prepare import remove_orphan_tmp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = tmp_path / "corpus"
    orphans = [tmp_path / f"corpus.tmp-{dead.pid}.bin", tmp_path / f"corpus.tmp-{dead.pid}.idx"]
    live = tmp_path / "corpus.tmp-1.bin"  # a writer that is still running (pid 1 always is)
    for f in (*orphans, live):
        f.write_bytes(b"x")
    D.write_documents(["One document, with a comma."], prefix, default_data.tokenizer_path, progress=False)
    assert not any(f.exists() for f in orphans) and live.exists()
    assert (tmp_path / "corpus.bin").exists() and remove_orphan_tmp(str(prefix)) == []
