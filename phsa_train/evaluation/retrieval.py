"""Synthetic long-context retrieval: a fact planted at a controlled depth in real corpus text, queried at the end.

One module for both users, so training and evaluation see exactly the same format:
  * ``phsa_train.eval`` scores a checkpoint on such sequences (length x depth grid), and
  * :func:`write_retrieval_mix` (``python -m data_prep retrieval-mix``) mixes a small share of them into a
    Megatron .bin/.idx training set, so small models can learn the skill the evaluation measures.

A sample (token ids; every piece is tokenized on its own and the ids are concatenated, so positions are
exact and known)::

    [ haystack[:p] | NEEDLE | haystack[p:n] | QUERY | ANSWER ]      length = n + |NEEDLE| + |QUERY| + |ANSWER|

``haystack`` is real corpus text (documents separated by EOD, as in the packed training stream), ``p =
round(depth * n)``: depth 0 puts the needle at the very start (inside INIT), depth 1 right before the query
(inside LOCAL); the depths in between are reachable for a PHSA layer only through its top-k blocks.

Kinds (``kind``):
  passkey  NEEDLE " The pass key is 48213. Remember it. 48213 is the pass key." QUERY " What is the pass key?
           The pass key is" ANSWER " 48213"
  kv       NEEDLE ' The value of key "amber-falcon" is 48213.' QUERY ' What is the value of key
           "amber-falcon"? The value of key "amber-falcon" is' ANSWER " 48213"

Scoring (:func:`score_answers`): one teacher-forced forward over the whole sample; at each answer position the
model's argmax is compared with the answer token. ``exact_match`` (all answer tokens right) is *exactly* the
greedy-decoding exact match (greedy decoding reproduces the answer iff every teacher-forced argmax is the
answer token), so one forward gives the same number as autoregressive decoding. ``token_accuracy`` (share of
answer tokens right) and ``answer_logprob`` (mean log-prob of the answer tokens) are softer signals for
small models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

KINDS = ("passkey", "kv")
_WORDS = ("amber", "falcon", "cedar", "violet", "harbor", "copper", "meadow", "silver", "orchid", "granite",
          "lantern", "willow", "ember", "tundra", "quartz", "saffron", "glacier", "maple", "cobalt", "river")


@dataclass(frozen=True)
class Fact:
    """The token ids of one planted fact: the needle, the query that ends the sample, and the answer."""

    key: str
    value: str
    needle: tuple[int, ...]
    query: tuple[int, ...]
    answer: tuple[int, ...]

    @property
    def overhead(self) -> int:
        """Tokens the fact adds to the haystack."""
        return len(self.needle) + len(self.query) + len(self.answer)


@dataclass(frozen=True)
class RetrievalSample:
    """One sequence and where its pieces are. ``tokens[answer_start:]`` is the answer (it ends the sample)."""

    tokens: np.ndarray  # int64 [length]
    depth: float
    needle_start: int  # tokens[needle_start:needle_end] == fact.needle
    needle_end: int
    answer_start: int
    fact: Fact

    @property
    def answer_len(self) -> int:
        return len(self.fact.answer)


def fact_texts(kind: str, key: str, value: str) -> tuple[str, str, str]:
    """(needle, query, answer) strings of one fact."""
    if kind == "passkey":
        return (f" The pass key is {value}. Remember it. {value} is the pass key.",
                " What is the pass key? The pass key is", f" {value}")
    if kind == "kv":
        return (f' The value of key "{key}" is {value}.',
                f' What is the value of key "{key}"? The value of key "{key}" is', f" {value}")
    raise ValueError(f"eval.retrieval.kind={kind!r} is not supported; allowed: {', '.join(KINDS)}")


def random_fact(rng: np.random.Generator, tokenizer, kind: str = "passkey", value_digits: int = 5) -> Fact:
    """A fact with a random value (``value_digits`` digits, no leading zero) and, for ``kv``, a random key."""
    if value_digits < 1:
        raise ValueError(f"eval.retrieval.value_digits={value_digits} must be >= 1")
    value = str(int(rng.integers(10 ** (value_digits - 1), 10 ** value_digits)))
    key = f"{_WORDS[rng.integers(len(_WORDS))]}-{_WORDS[rng.integers(len(_WORDS))]}"
    needle, query, answer = (tuple(tokenizer.tokenize(t)) for t in fact_texts(kind, key, value))
    return Fact(key, value, needle, query, answer)


def make_sample(haystack: np.ndarray, fact: Fact, length: int, depth: float) -> RetrievalSample:
    """Plant ``fact`` at ``depth`` (0..1) of the first ``length - fact.overhead`` tokens of ``haystack``.

    Raises ValueError when ``length`` leaves no room for the fact or the haystack is too short.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"eval.retrieval.depths: {depth} is outside [0, 1]")
    n = length - fact.overhead
    if n < 0:
        raise ValueError(f"eval.retrieval.lengths: {length} tokens cannot hold the fact ({fact.overhead} tokens)")
    if len(haystack) < n:
        raise ValueError(f"haystack of {len(haystack)} tokens is shorter than the {n} a {length}-token sample needs")
    hay = np.asarray(haystack[:n], dtype=np.int64)
    p = int(round(depth * n))
    parts = [hay[:p], fact.needle, hay[p:], fact.query, fact.answer]
    tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])
    return RetrievalSample(tokens, depth, p, p + len(fact.needle), length - len(fact.answer), fact)


def score_answers(logits, tokens, answer_start, answer_len: int) -> dict:
    """Teacher-forced answer scores of a batch of samples whose answer ends the sequence.

    logits [b, L, V] (position t predicts token t + 1), tokens [b, L] (torch tensors), answer_start: the
    samples' common answer start (int) or a [b] sequence, answer_len: tokens in every answer.
    Returns per-sample float lists: exact_match (= greedy-decoding exact match), token_accuracy, answer_logprob.
    """
    import torch

    b, L, _ = logits.shape
    starts = torch.as_tensor(answer_start, device=logits.device).reshape(-1).expand(b)
    pos = starts[:, None] + torch.arange(answer_len, device=logits.device)[None, :]  # [b, a] answer token positions
    if int(pos.max()) >= L or int(pos.min()) < 1:
        raise ValueError(f"answer positions {pos.min().item()}..{pos.max().item()} outside 1..{L - 1}")
    pred_logits = logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).float()  # [b, a, V]
    target = tokens.to(logits.device).gather(1, pos)  # [b, a]
    correct = pred_logits.argmax(-1) == target
    logprob = torch.log_softmax(pred_logits, -1).gather(-1, target[..., None])[..., 0]
    return {"exact_match": correct.all(-1).float().tolist(), "token_accuracy": correct.float().mean(-1).tolist(),
            "answer_logprob": logprob.mean(-1).tolist()}


# ----------------------------------------------------------------------------------------- training-data mix
# Prose tokens before each query of a multi-fact document: consecutive answers are then more than 48 + |QUERY|
# (~75) tokens apart, so a query block of 64 (its queries share one selection) never holds two answers that
# need different facts.
QUERY_GAP = (48, 96)


def distinct_facts(rng: np.random.Generator, tokenizer, kind: str, value_digits: int, n: int) -> list[Fact]:
    """``n`` random facts with pairwise different keys (a query must have one answer)."""
    facts: dict[str, Fact] = {}
    for _ in range(100 * n):
        f = random_fact(rng, tokenizer, kind, value_digits)
        facts.setdefault(f.key, f)
        if len(facts) == n:
            return list(facts.values())
    raise ValueError(f"cannot draw {n} facts with distinct keys ({len(_WORDS) ** 2} keys exist)")


def make_multi_fact_document(haystack: np.ndarray, facts: list[Fact], rng: np.random.Generator) -> np.ndarray:
    """Token ids ``[ prose with every NEEDLE at a random place | (prose gap, QUERY, ANSWER) per fact ]``.

    ``haystack`` [n] holds all the prose; each query is preceded by ``QUERY_GAP`` prose tokens and the queries
    come in random order, so a needle lies anywhere from a gap to the whole document before its query.
    """
    gaps = rng.integers(QUERY_GAP[0], QUERY_GAP[1] + 1, len(facts))
    body_len = len(haystack) - int(gaps.sum())
    if body_len < 0:
        raise ValueError(f"a haystack of {len(haystack)} tokens cannot hold {len(facts)} query gaps")
    at = np.sort(rng.integers(0, body_len + 1, len(facts)))
    parts, prev = [], 0
    for p, f in zip(at, facts):
        parts += [haystack[prev:p], f.needle]
        prev = p
    parts.append(haystack[prev:body_len])
    cut = body_len
    for i, g in zip(rng.permutation(len(facts)), gaps):
        parts += [haystack[cut:cut + g], facts[i].query, facts[i].answer]
        cut += int(g)
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])


def haystack_slice(stream: np.ndarray, n: int, rng: np.random.Generator, eod: int | None = None) -> np.ndarray:
    """``n`` consecutive tokens of ``stream`` from a random offset; with ``eod`` given, EOD tokens are dropped
    first (for ``data.reset_attention_mask=true`` models, where an EOD would cut the needle off the query)."""
    take = n if eod is None else n + n // 4 + 64  # a little spare for the dropped EODs
    for _ in range(100):
        start = int(rng.integers(0, max(1, len(stream) - take)))
        hay = np.asarray(stream[start:start + take], dtype=np.int64)
        if eod is not None:
            hay = hay[hay != eod]
        if len(hay) >= n:
            return hay[:n]
    raise ValueError(f"--base-prefix: the corpus ({len(stream)} tokens) is too short for {n}-token haystacks")


@dataclass(frozen=True)
class MixResult:
    prefix: str
    punct_path: str
    base_docs: int
    planted_docs: int
    tokens: int
    planted_tokens: int


def write_retrieval_mix(base_prefix: str, output_prefix: str, tokenizer, *, share: float = 0.05,
                        seq_len: int = 8192, min_len: int | None = None, max_len: int | None = None,
                        kind: str = "passkey", value_digits: int = 5, seed: int = 1234,
                        drop_haystack_eod: bool = False, punct_charset: str = "en", fact_every: int = 0,
                        pure_tail: float = 0.0) -> MixResult:
    """Copy ``base_prefix`` (.bin/.idx) to ``output_prefix`` with retrieval documents interleaved.

    Each planted document is real text of the base corpus (a random slice of its EOD-separated token stream)
    with a fact at a uniformly random depth, the query and the answer at its end, and an EOD after it. Its
    length is uniform in [min_len, max_len] (defaults max(seq_len // 16, 128) and seq_len // 2): Megatron's GPTDataset
    packs documents into seq_len + 1 windows across boundaries, so a document of length l lies whole in one
    window with probability about 1 - l / seq_len; shorter documents keep needle and query together more often.
    Planted documents take ``share`` of the output tokens and are inserted at random positions among the base
    documents (not appended: Megatron splits train/valid by document index). Deterministic in ``seed``.
    The punctuation table ``<output_prefix>_punct.json`` is rebuilt for ``tokenizer``.

    ``fact_every`` > 0 writes multi-fact documents instead (:func:`make_multi_fact_document`): one fact per
    ``fact_every`` tokens, all asked at the end, many answers per document for a model to learn from.
    ``pure_tail`` > 0 keeps the last ``pure_tail`` of the output's documents pure base text: no retrieval
    document among them and no haystack cut from them, so a ``data.split`` whose valid + test shares sum to at
    most ``pure_tail`` validates (and the evaluation builds its haystacks) on text never seen in training.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phsa_train.data import MegatronTokenizer, build_punct_table, write_punct_table
    from phsa_train.data.prepare import atomic_indexed_dataset

    tok = tokenizer if isinstance(tokenizer, MegatronTokenizer) else MegatronTokenizer(tokenizer)
    if not 0.0 < share < 1.0:
        raise ValueError(f"--share={share} must be in (0, 1)")
    max_len = seq_len // 2 if max_len is None else max_len
    min_len = min(max_len, max(seq_len // 16, 128)) if min_len is None else min_len
    if not 1 <= min_len <= max_len:
        raise ValueError(f"--min-len={min_len} and --max-len={max_len}: need 1 <= min-len <= max-len")
    if not (os.path.exists(base_prefix + ".bin") and os.path.exists(base_prefix + ".idx")):
        raise FileNotFoundError(f"--base-prefix: no Megatron dataset at {base_prefix}(.bin/.idx)")
    if fact_every < 0:
        raise ValueError(f"--fact-every={fact_every} must be >= 0 (0: one fact per document)")
    if fact_every and kind != "kv":
        raise ValueError(f"--fact-every={fact_every} needs --kind kv (every pass key is asked the same way)")
    if not 0.0 <= pure_tail < 1.0:
        raise ValueError(f"--pure-tail={pure_tail} must be in [0, 1)")
    base = IndexedDataset(base_prefix)
    stream = np.memmap(base_prefix + ".bin", dtype=base.index.dtype, mode="r")
    base_tokens = int(len(stream))
    rng = np.random.default_rng(seed)
    mean_len = (min_len + max_len) / 2
    n_planted = max(1, int(round(share / (1 - share) * base_tokens / mean_len)))
    n_tail = int(np.ceil(pure_tail * (len(base) + n_planted)))
    if n_tail >= len(base):
        raise ValueError(f"--pure-tail={pure_tail}: {n_tail} pure documents leave no base text for the haystacks")
    # Haystacks come from the base documents before the pure tail.
    source = stream[:int(np.sum(base.index.sequence_lengths[:len(base) - n_tail], dtype=np.int64))]
    # Planted document j goes right before base document slot[j] (slot == len(base): at the end).
    slots = np.sort(rng.integers(0, len(base) - n_tail + 1, n_planted))

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    planted_tokens, j = 0, 0
    eod = tok.eod
    with atomic_indexed_dataset(output_prefix, base.index.dtype) as builder:
        for i in range(len(base) + 1):
            while j < n_planted and slots[j] == i:
                hay_eod = eod if drop_haystack_eod else None
                if fact_every:
                    length = int(rng.integers(min_len, max_len + 1))
                    facts = distinct_facts(rng, tok, kind, value_digits, max(1, length // fact_every))
                    need = sum(f.overhead for f in facts) + len(facts) * QUERY_GAP[1]
                    if length < need:
                        raise ValueError(f"--fact-every={fact_every}: a {length}-token document cannot hold "
                                         f"{len(facts)} facts and their query gaps ({need} tokens); raise it")
                    hay = haystack_slice(source, length - sum(f.overhead for f in facts), rng, hay_eod)
                    tokens = make_multi_fact_document(hay, facts, rng)
                else:
                    fact = random_fact(rng, tok, kind, value_digits)
                    length = int(rng.integers(min_len, max_len + 1))
                    if length <= fact.overhead:
                        raise ValueError(f"--min-len={min_len} cannot hold a fact ({fact.overhead} tokens)")
                    hay = haystack_slice(source, length - fact.overhead, rng, hay_eod)
                    tokens = make_sample(hay, fact, length, float(rng.random())).tokens
                doc = np.append(tokens, eod)
                builder.add_document(doc, [len(doc)])
                planted_tokens += len(doc)
                j += 1
            if i < len(base):
                doc = base[i]
                builder.add_document(doc, [len(doc)])
    punct = write_punct_table(build_punct_table(tok, punct_charset), output_prefix, tok)
    return MixResult(output_prefix, punct, len(base), n_planted, base_tokens + planted_tokens, planted_tokens)
