"""Block scoring + top-k selection without materialising the [L, nb] score matrix.

Layouts
    Q       [b, L, hq, d] (last stride 1), bf16/fp16/fp32; query head h belongs to KV head h // G
    REP     [n_rep, hk, d] from ``reps.py`` (row rep_offset + t = block t of a sequence): M in Q's dtype
    SEQ     int32 [n_seq, 4]: (batch, start, length, rep_offset); positions, blocks, INIT, LOCAL and the
            selected indices are all relative to ``start`` (packed documents are independent sequences)
    LSEBUF  fp32 [b, L, hq] scratch: per-(query, head) log2-sum-exp of the block logits, used only when a
            group has more than BM = 128 rows (otherwise the normaliser stays in registers)
    SEL     int32 [b, L, hk, topk]: written only at the first row i0 of every query group (query_block B),
            ascending block indices, -1 padded. The public API expands it to every row.

Algorithm (``score=softmax_group_sum``): one program = NG query groups (when a group's B*G rows are few) or one
group split in NCH row chunks of BM rows (when B*G > BM), for one KV head g. Rows are (query, head) pairs of the
group(s). Programs run longest first (the last groups see the most blocks).
    eligible t: n_init // m <= t <= (i0 - w) // m  (i0 = first query of the group)
    pass 1: stream the eligible representatives in tiles of BN blocks and keep an online max / sum per row
        -> lse2 (base 2): O(L*hq) floats, no [L, nb] matrix;
    pass 2: stream the tiles again, p = exp2(s - lse2), sum over the rows of each group -> [NG, BN] scores, and
        insert them into a running top-k buffer kept in registers: every (score, block) pair is packed into one
        int64 whose order is (score, block index), so ties go to the later block and all keys are distinct; while
        the tile's largest key beats the buffer's smallest, it replaces it (two reductions per insertion; most
        tiles need none once the buffer is good). At the end the buffer, sorted, is the selection.
    Tiles that every row of the program may select (all but the last one or two) run without eligibility masks.
Opt-in variants (``select_launch`` keywords, same function up to fp32 summation order, docs/kernels.md):
    pipelined   the next tile's dot is issued before this tile's exponentials (``_row_lse2_pipelined`` and
                pass 2's pipelined loops), so the wgmma runs while the exp2 do;
    lse_mode    pass 1 with a fixed per-row offset and an elementwise accumulator (``_row_lse2_offset``),
                "offset_t" on transposed tiles;
    transposed  pass 2 on s^T [BN, rows] = M @ q^T: the group sum is in-thread + quad shuffles (``_group_sum``);
    topk_prefilter  an fp32 test before the int64 insertion (``_topk_insert_prefiltered``);
    max_rows    rows per program: 256 puts two 128-row groups in one program (NG = 2), which streams the
                representatives once for both.
``score=dot_group_sum`` (the shipped score) runs ``select_dot.py`` instead: the score is linear in q, so each
group's rows are summed first and one pass streams the representatives with one row per group. The running top-k
both kernels share is ``topk.py``.
Precision (the score's definition, shared with the reference): the logits are q . M with q and M in the input
dtype (M rounded once by ``reps.py``) and fp32 accumulation: one tensor-core dot per tile and pass. The
products of two bf16 / fp16 numbers are exact in fp32, so kernel and reference differ only in the order of the
fp32 sums, and selections agree except at genuine near-ties.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .select_dot import NO_SECOND_PIECE, _program_groups, dot_select_launch, program_count
from .topk import _store_selection, _topk_buffer, _topk_step


@triton.jit
def _dot_reps(q, REP, roff, tt, tmask, cols, hk, D: tl.constexpr, PREC: tl.constexpr):
    """[rows, BN] fp32 q . M of the query rows ``q`` against the representatives of blocks ``tt`` (unscaled)."""
    moff = ((roff + tt).to(tl.int64) * hk)[:, None] * D + cols[None, :]
    m = tl.load(REP + moff, mask=tmask[:, None], other=0.0)
    return tl.dot(q, tl.trans(m), input_precision=PREC)


@triton.jit
def _dot_reps_t(q_t, REP, roff, tt, tmask, cols, hk, D: tl.constexpr, PREC: tl.constexpr):
    """[BN, rows] fp32 M . q^T: ``_dot_reps`` transposed, q_t [D, rows] (transposed once, outside the loops)."""
    moff = ((roff + tt).to(tl.int64) * hk)[:, None] * D + cols[None, :]
    m = tl.load(REP + moff, mask=tmask[:, None], other=0.0)
    return tl.dot(m, q_t, input_precision=PREC)


@triton.jit
def _exp2(x, FTZ: tl.constexpr):
    """2^x in fp32. FTZ: the bare MUFU instruction (ex2.approx.ftz), results below 2^-126 flush to 0; tl.exp2
    wraps the same instruction in denormal handling, extra issue slots on the selection's busiest pipe. A term
    below 2^-126 of a row's largest changes no normaliser and no score above 2^-126. The CPU interpreter has no
    inline assembly: FTZ is for CUDA only."""
    if FTZ:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _query_rows(c, j_first, j_end, n, W, shift, start, b64, g, Q, sq_b, sq_l, sq_h, cols,
                GRP: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr):
    """Row chunk c of a program: rows are (query, head) pairs of its query groups. Returns q [BM, D], valid,
    t_hi (last eligible block of the row's group, -1 if none), the query row in Q and the head in the KV group."""
    rr = c * BM + tl.arange(0, BM)
    gi = rr // GRP
    wr = rr % GRP
    ql = wr // G
    hh = wr % G
    i0 = (j_first + gi) * QB
    qi = i0 + ql
    valid = (ql < QB) & (qi < n) & (j_first + gi < j_end)
    t_hi = tl.where(i0 >= W, (i0 - W) // BS, -1)
    row = (start + qi - shift).to(tl.int64)
    q = tl.load(Q + b64 * sq_b + row[:, None] * sq_l + (g * G + hh)[:, None] * sq_h + cols[None, :],
                mask=valid[:, None], other=0.0)
    return q, valid, t_hi, row, hh


@triton.jit
def _row_lse2(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2,
              BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr):
    """[BM] log2-sum-exp of every row's logits (scale2 * q . M, log2 units) over its eligible blocks; +inf for
    invalid rows (so that their pass-2 probabilities are 0). Tiles below t_full are eligible for every row and
    run without masks; the online max is kept on the unscaled dot (scale2 > 0), so each logit costs one FMA."""
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for t0 in range(t_lo, t_full, BN):
        tt = t0 + tl.arange(0, BN)
        raw = _dot_reps(q, REP, roff, tt, tt >= 0, cols, hk, D, PREC)
        m_new = tl.maximum(m_i, tl.max(raw, axis=1))
        l_i = l_i * _exp2((m_i - m_new) * scale2, FTZ) + tl.sum(
            _exp2(tl.fma(raw, scale2, -(m_new * scale2)[:, None]), FTZ), axis=1)
        m_i = m_new
    for t0 in range(t_full, t_max + 1, BN):
        tt = t0 + tl.arange(0, BN)
        tmask = tt <= t_max
        raw = _dot_reps(q, REP, roff, tt, tmask, cols, hk, D, PREC)
        raw = tl.where((tt[None, :] <= t_hi[:, None]) & tmask[None, :], raw, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(raw, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * _exp2((m_i - m_safe) * scale2, FTZ) + tl.sum(
            _exp2(tl.fma(raw, scale2, -(m_safe * scale2)[:, None]), FTZ), axis=1)
        m_i = m_new
    return tl.where(valid, m_i * scale2 + tl.log2(l_i), float("inf"))


@triton.jit
def _row_lse2_offset(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2,
                     BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
                     TRANS: tl.constexpr):
    """``_row_lse2`` with a fixed per-row offset instead of an online max: c = the row's largest logit in its
    first tile, then every tile only adds exp2(s - c) into an elementwise [tile] accumulator; one reduction at the
    end, none per tile (no max, no rescale). l >= 1 (the term at c), so nothing underflows that matters; a logit
    more than ~2^7 (log2 units) above c overflows l to +inf, and then the program recomputes the rows with the
    online loop (a rare branch: always correct). TRANS: tiles are s^T = M [BN, D] @ q^T [D, BM] (blocks on the
    wgmma M side, the rows on its N side: a full-width instruction even for BN = 64)."""
    tt = t_lo + tl.arange(0, BN)
    tmask = tt <= t_max
    first = _dot_reps(q, REP, roff, tt, tmask, cols, hk, D, PREC)
    first = tl.where((tt[None, :] <= t_hi[:, None]) & tmask[None, :], first, float("-inf"))
    c = tl.max(first, axis=1)
    cs = tl.where(c == float("-inf"), 0.0, c) * scale2
    if TRANS:
        q_t = tl.trans(q)
        cs_t = cs[None, :]
        acc_t = tl.zeros([BN, BM], tl.float32)
        for t0 in range(t_lo, t_full, BN):
            tt = t0 + tl.arange(0, BN)
            acc_t += _exp2(tl.fma(_dot_reps_t(q_t, REP, roff, tt, tt >= 0, cols, hk, D, PREC), scale2, -cs_t), FTZ)
        for t0 in range(t_full, t_max + 1, BN):
            tt = t0 + tl.arange(0, BN)
            tmask = tt <= t_max
            e = _exp2(tl.fma(_dot_reps_t(q_t, REP, roff, tt, tmask, cols, hk, D, PREC), scale2, -cs_t), FTZ)
            acc_t += tl.where((tt[:, None] <= t_hi[None, :]) & tmask[:, None], e, 0.0)
        l_i = tl.sum(acc_t, axis=0)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
        for t0 in range(t_lo, t_full, BN):
            tt = t0 + tl.arange(0, BN)
            acc += _exp2(tl.fma(_dot_reps(q, REP, roff, tt, tt >= 0, cols, hk, D, PREC), scale2, -cs[:, None]), FTZ)
        for t0 in range(t_full, t_max + 1, BN):
            tt = t0 + tl.arange(0, BN)
            tmask = tt <= t_max
            e = _exp2(tl.fma(_dot_reps(q, REP, roff, tt, tmask, cols, hk, D, PREC), scale2, -cs[:, None]), FTZ)
            acc += tl.where((tt[None, :] <= t_hi[:, None]) & tmask[None, :], e, 0.0)
        l_i = tl.sum(acc, axis=1)
    lse2 = tl.where(valid, cs + tl.log2(l_i), float("inf"))
    if tl.max((valid & (l_i == float("inf"))).to(tl.int32), axis=0) > 0:
        lse2 = _row_lse2(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2, BM, BN, D, PREC, FTZ)
    return lse2


@triton.jit
def _lse_tile(s, m_i, l_i, cs, t0, t_hi, t_max, scale2, BN: tl.constexpr, MASKED: tl.constexpr,
              LSE: tl.constexpr, FTZ: tl.constexpr):
    """One pass-1 tile of logits s: LSE 0 updates the online (max m_i, sum l_i) per row; 1 / 2 add exp2(s - c)
    into the elementwise accumulator l_i ([rows, BN] / transposed [BN, rows]; m_i unused)."""
    tt = t0 + tl.arange(0, BN)
    if LSE == 0:
        if MASKED:
            s = tl.where((tt[None, :] <= t_hi[:, None]) & (tt <= t_max)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
        l_i = l_i * _exp2((m_i - m_safe) * scale2, FTZ) + tl.sum(
            _exp2(tl.fma(s, scale2, -(m_safe * scale2)[:, None]), FTZ), axis=1)
        m_i = m_new
    elif LSE == 1:
        e = _exp2(tl.fma(s, scale2, -cs[:, None]), FTZ)
        if MASKED:
            e = tl.where((tt[None, :] <= t_hi[:, None]) & (tt <= t_max)[None, :], e, 0.0)
        l_i += e
    else:
        e = _exp2(tl.fma(s, scale2, -cs[None, :]), FTZ)
        if MASKED:
            e = tl.where((tt[:, None] <= t_hi[None, :]) & (tt <= t_max)[:, None], e, 0.0)
        l_i += e
    return m_i, l_i


@triton.jit
def _row_lse2_pipelined(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2,
                        BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
                        LSE: tl.constexpr):
    """Pass 1 (``lse_mode`` LSE: 0 online, 1 offset, 2 offset on transposed tiles) with the next tile's dot issued
    before this tile's exponentials: Triton then keeps that wgmma in flight while the exp2 run (the other loops
    wait for each dot right after issuing it). Needs a loop body without runtime branches before the exponentials
    (a branch makes Triton wait first), hence one loop for the unmasked tiles and one for the masked ones, the
    in-flight tile carried from the first to the second; costs a second logits tile in registers and one
    all-masked dot at the end. Same arithmetic per tile as ``_row_lse2`` / ``_row_lse2_offset``."""
    s = _tile_dot(q, REP, roff, t_lo, t_max, cols, hk, BN, D, PREC, False)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    cs = m_i
    if LSE == 0:
        l_i = tl.zeros([BM], tl.float32)
        q_x = q
    else:
        tt = t_lo + tl.arange(0, BN)
        c = tl.max(tl.where((tt[None, :] <= t_hi[:, None]) & (tt <= t_max)[None, :], s, float("-inf")), axis=1)
        cs = tl.where(c == float("-inf"), 0.0, c) * scale2
        if LSE == 2:
            q_x = tl.trans(q)
            s = _tile_dot(q_x, REP, roff, t_lo, t_max, cols, hk, BN, D, PREC, True)
            l_i = tl.zeros([BN, BM], tl.float32)
        else:
            q_x = q
            l_i = tl.zeros([BM, BN], tl.float32)
    for t0 in range(t_lo, t_full, BN):
        s_next = _tile_dot(q_x, REP, roff, t0 + BN, t_max, cols, hk, BN, D, PREC, LSE == 2)
        m_i, l_i = _lse_tile(s, m_i, l_i, cs, t0, t_hi, t_max, scale2, BN, False, LSE, FTZ)
        s = s_next
    for t0 in range(t_full, t_max + 1, BN):
        s_next = _tile_dot(q_x, REP, roff, t0 + BN, t_max, cols, hk, BN, D, PREC, LSE == 2)
        m_i, l_i = _lse_tile(s, m_i, l_i, cs, t0, t_hi, t_max, scale2, BN, True, LSE, FTZ)
        s = s_next
    if LSE == 0:
        lse2 = tl.where(valid, m_i * scale2 + tl.log2(l_i), float("inf"))
    else:
        l_i = tl.sum(l_i, axis=0 if LSE == 2 else 1)
        lse2 = tl.where(valid, cs + tl.log2(l_i), float("inf"))
        if tl.max((valid & (l_i == float("inf"))).to(tl.int32), axis=0) > 0:
            lse2 = _row_lse2(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2, BM, BN, D, PREC, FTZ)
    return lse2


@triton.jit
def _pass1(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2,
           BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
           LSE: tl.constexpr, PIPE: tl.constexpr):
    """Pass 1 as chosen by ``lse_mode``: 0 online (``_row_lse2``), 1 offset, 2 offset with transposed tiles;
    PIPE: ``_row_lse2_pipelined``."""
    if PIPE:
        lse2 = _row_lse2_pipelined(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2, BM, BN, D, PREC,
                                   FTZ, LSE)
    elif LSE == 0:
        lse2 = _row_lse2(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2, BM, BN, D, PREC, FTZ)
    else:
        lse2 = _row_lse2_offset(q, valid, t_hi, REP, roff, cols, hk, t_lo, t_full, t_max, scale2, BM, BN, D, PREC,
                                FTZ, LSE == 2)
    return lse2


@triton.jit
def _maybe_trans(q, TRANS: tl.constexpr):
    """q^T [D, rows] for the transposed tiles (once per program, outside the tile loop), else q unchanged."""
    if TRANS:
        q = tl.trans(q)
    return q


@triton.jit
def _tile_dot(q_or_t, REP, roff, t0, t_max, cols, hk, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
              TRANS: tl.constexpr):
    """Unscaled logits of blocks [t0, t0 + BN) (blocks past t_max read as zeros): [rows, BN] from q, or with TRANS
    [BN, rows] from q_t."""
    tt = t0 + tl.arange(0, BN)
    if TRANS:
        s = _dot_reps_t(q_or_t, REP, roff, tt, tt <= t_max, cols, hk, D, PREC)
    else:
        s = _dot_reps(q_or_t, REP, roff, tt, tt <= t_max, cols, hk, D, PREC)
    return s


@triton.jit
def _group_sum(s, lse2, t_hi, tt, tmask, masked, scale2, NG: tl.constexpr, RPG: tl.constexpr, BN: tl.constexpr,
               FTZ: tl.constexpr, TRANS: tl.constexpr):
    """[NG, BN] sums over each group's rows of p = exp2(scale2 * s - lse2) (0 on rows with lse2 = +inf) for the
    logits s of blocks ``tt``. Rows layout (s [rows, BN]): the group sum runs over axis 0, which the wgmma
    accumulator spreads over the 4 warps (16-row slabs): a cross-warp reduction through shared memory every tile.
    TRANS (s [BN, rows]): the sum runs over axis 1 (in-thread adds + quad shuffles) and the blocks take the wgmma
    M side (64 per warpgroup instruction)."""
    if TRANS:
        p = _exp2(tl.fma(s, scale2, -lse2[None, :]), FTZ)
        if masked:
            p = tl.where((tt[:, None] <= t_hi[None, :]) & tmask[:, None], p, 0.0)
        if NG == 1:
            acc = tl.sum(p, axis=1)[None, :]
        else:
            acc = tl.trans(tl.sum(tl.reshape(p, [BN, NG, RPG]), axis=2))
    else:
        p = _exp2(tl.fma(s, scale2, -lse2[:, None]), FTZ)
        if masked:
            p = tl.where((tt[None, :] <= t_hi[:, None]) & tmask[None, :], p, 0.0)
        if NG == 1:  # every row in one group: a plain column sum, no reshape (layout conversion) needed
            acc = tl.sum(p, axis=0)[None, :]
        else:
            acc = tl.sum(tl.reshape(p, [NG, RPG, BN]), axis=1)
    return acc


@triton.jit(do_not_specialize=["TOPK"])  # top-k changes every step of a curriculum ramp: not a JIT key
def _select_kernel(
    Q, REP, SEQ, LSEBUF, SEL,
    sq_b, sq_l, sq_h, ss_b, ss_l, ss_h, L, hq, hk,
    scale2, n_init, W, TOPK, QOFF, QROW2, QOFF2,
    PREC: tl.constexpr, FTZ: tl.constexpr,
    G: tl.constexpr, QB: tl.constexpr, GRP: tl.constexpr, BM: tl.constexpr, NCH: tl.constexpr,
    NG: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BN1: tl.constexpr, LSE: tl.constexpr, TRANS: tl.constexpr, PREFILTER: tl.constexpr, PIPE: tl.constexpr,
):
    # programs run longest first (the last query groups see the most blocks): a shorter tail at the end
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    si = tl.program_id(1)
    g = tl.program_id(2)
    batch = tl.load(SEQ + si * 4 + 0)
    start = tl.load(SEQ + si * 4 + 1)
    n = tl.load(SEQ + si * 4 + 2)
    roff = tl.load(SEQ + si * 4 + 3)
    # Q, LSEBUF and SEL hold the query rows of one piece [QOFF, n) or two (see select_dot._program_groups)
    j_first, j_end, shift = _program_groups(pid, (n + QB - 1) // QB, QOFF, QROW2, QOFF2, QB, NG)
    if j_first >= j_end:
        return
    j_last = tl.minimum(j_first + NG - 1, j_end - 1)
    t_lo = n_init // BS
    t_max = (tl.maximum(j_last * QB - W, -BS) + BS) // BS - 1  # -1 when no block is eligible
    # tiles [t_lo, t_full) are eligible for every row of the program (the first group sees the fewest blocks);
    # pass 1 tiles BN1 blocks, pass 2 BN
    t_hi_first = tl.where(j_first * QB >= W, (j_first * QB - W) // BS, -1)
    n_full = tl.maximum(t_hi_first - t_lo + 1, 0)
    t_full1 = t_lo + n_full // BN1 * BN1
    t_full = t_lo + n_full // BN * BN
    cols = tl.arange(0, D)
    b64 = batch.to(tl.int64)
    RPG: tl.constexpr = BM // NG  # rows per group inside one chunk
    REPg = REP + g * D

    # ---- pass 1: per-row log2-sum-exp over the eligible blocks -----------------------------------------------
    if NCH == 1:  # one chunk: q and the normaliser stay in registers for pass 2
        q, valid, t_hi, row, hh = _query_rows(0, j_first, j_end, n, W, shift, start, b64, g, Q, sq_b, sq_l, sq_h,
                                              cols, GRP, G, QB, BM, BS)
        lse2 = _pass1(q, valid, t_hi, REPg, roff, cols, hk, t_lo, t_full1, t_max, scale2, BM, BN1, D, PREC, FTZ, LSE,
                      PIPE)
        q_t = _maybe_trans(q, TRANS)
    else:  # a group of more than BM rows: normalisers go through the LSEBUF scratch
        for c in tl.static_range(NCH):
            q, valid, t_hi, row, hh = _query_rows(c, j_first, j_end, n, W, shift, start, b64, g, Q, sq_b, sq_l,
                                                  sq_h, cols, GRP, G, QB, BM, BS)
            lse2 = _pass1(q, valid, t_hi, REPg, roff, cols, hk, t_lo, t_full1, t_max, scale2, BM, BN1, D, PREC, FTZ,
                          LSE, False)  # pipelined only with one chunk
            tl.store(LSEBUF + (b64 * L + row) * hq + g * G + hh, lse2, mask=valid)
        # pass 2 reads rows that other threads of this program wrote: make those stores visible first
        tl.debug_barrier()

    # ---- pass 2: group scores per tile, running top-k merge -------------------------------------------------
    gidx = tl.arange(0, NG)
    i0g = (j_first + gidx) * QB
    t_hi_g = tl.where((i0g >= W) & (j_first + gidx < j_end), (i0g - W) // BS, -1)
    buf, thr, slot, MIN64 = _topk_buffer(NG, KB, BN, TOPK)
    if PIPE and NCH == 1:  # the next tile's dot in flight during this tile's exponentials (_row_lse2_pipelined)
        s = _tile_dot(q_t, REPg, roff, t_lo, t_max, cols, hk, BN, D, PREC, TRANS)
        for t0 in range(t_lo, t_full, BN):
            s_next = _tile_dot(q_t, REPg, roff, t0 + BN, t_max, cols, hk, BN, D, PREC, TRANS)
            tt = t0 + tl.arange(0, BN)
            acc = _group_sum(s, lse2, t_hi, tt, tt <= t_max, False, scale2, NG, RPG, BN, FTZ, TRANS)
            buf, thr = _topk_step(acc, tt, t_hi_g, tt <= t_max, buf, thr, MIN64, PREFILTER)
            s = s_next
        for t0 in range(t_full, t_max + 1, BN):
            s_next = _tile_dot(q_t, REPg, roff, t0 + BN, t_max, cols, hk, BN, D, PREC, TRANS)
            tt = t0 + tl.arange(0, BN)
            acc = _group_sum(s, lse2, t_hi, tt, tt <= t_max, True, scale2, NG, RPG, BN, FTZ, TRANS)
            buf, thr = _topk_step(acc, tt, t_hi_g, tt <= t_max, buf, thr, MIN64, PREFILTER)
            s = s_next
    else:
        for t0 in range(t_lo, t_max + 1, BN):
            tt = t0 + tl.arange(0, BN)
            tmask = tt <= t_max
            acc = tl.zeros([NG, BN], tl.float32)
            for c in tl.static_range(NCH):
                if NCH > 1:
                    q, valid, t_hi, row, hh = _query_rows(c, j_first, j_end, n, W, shift, start, b64, g, Q, sq_b,
                                                          sq_l, sq_h, cols, GRP, G, QB, BM, BS)
                    lse2 = tl.load(LSEBUF + (b64 * L + row) * hq + g * G + hh, mask=valid, other=float("inf"))
                    q_t = _maybe_trans(q, TRANS)
                s = _tile_dot(q_t, REPg, roff, t0, t_max, cols, hk, BN, D, PREC, TRANS)
                acc += _group_sum(s, lse2, t_hi, tt, tmask, t0 >= t_full, scale2, NG, RPG, BN, FTZ, TRANS)
            buf, thr = _topk_step(acc, tt, t_hi_g, tmask, buf, thr, MIN64, PREFILTER)
    _store_selection(buf, slot, TOPK, SEL, b64 * ss_b, (start + i0g - shift).to(tl.int64) * ss_l + g * ss_h,
                     (j_first + gidx) < j_end)


_LSE_MODES = ("online", "offset", "offset_t")


def softmax_select_meta(G, B, d, topk, block_size, half, cuda, *, block_n=64, num_warps=4, num_stages=3,
                        ftz_exp2=False, lse_mode="online", lse_block_n=32, transposed=True, topk_prefilter=False,
                        pipelined=False, max_registers=None, max_rows=128):
    """(constexprs, launch options) of ``_select_kernel`` for G query heads per KV head, query_block B, head dim
    d, ``topk`` and the tuning keywords of ``select_launch`` (docstring there); ``half``: bf16 / fp16 inputs,
    ``cuda``: options that only the GPU compiler has. Also compiles the kernel offline
    (``bench/select_registers.py``)."""
    if lse_mode not in _LSE_MODES:
        raise ValueError(f"select_launch: lse_mode={lse_mode!r}; allowed: {', '.join(_LSE_MODES)}")
    bn1 = block_n if lse_block_n is None else lse_block_n
    for name, v in (("block_n", block_n), ("lse_block_n", bn1)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"select_launch: {name}={v}; allowed: a power of two >= 16")
    if max_rows < 128 or max_rows & (max_rows - 1):
        # fewer rows would split 128-row groups into chunks, whose normalisers need the LSEBUF scratch that
        # the caller sizes for groups of more than 128 rows only
        raise ValueError(f"select_launch: max_rows={max_rows}; allowed: a power of two >= 128")
    grp = triton.next_power_of_2(B * G)
    BM = max(16, min(grp, max_rows))
    constexprs = dict(
        PREC="tf32" if half else "ieee", FTZ=ftz_exp2 and cuda, G=G, QB=B, GRP=max(grp, 1), BM=BM,
        NCH=max(1, grp // BM), NG=max(1, BM // grp), BN=block_n, KB=triton.next_power_of_2(max(topk, 1)),
        BS=block_size, D=d, BN1=bn1, LSE=_LSE_MODES.index(lse_mode), TRANS=transposed, PREFILTER=topk_prefilter,
        PIPE=pipelined,
    )
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if max_registers and cuda:
        options["maxnreg"] = max_registers
    return constexprs, options


def select_launch(q, rep, seq, max_n, params, topk, sel, lsebuf, *, qoff=0, pieces=None, block_n=64, num_warps=4,
                  num_stages=3, ftz_exp2=False, lse_mode="online", lse_block_n=32, transposed=True,
                  topk_prefilter=False, pipelined=False, max_registers=None, max_rows=128, dot_groups=16,
                  dot_block_n=128, dot_tensor_cores=True):
    """Fill ``sel`` (int32 [b, L, hk, topk], group-start rows) for every sequence of ``seq``.

    ``qoff``: q, sel (and lsebuf) hold the query rows [qoff, n) of each sequence. ``pieces`` = (row2, qoff2):
    q's rows [0, row2) are the positions [qoff, qoff + row2) and its rows from row2 on the positions from qoff2
    (unpacked sequences; row2, qoff and qoff2 multiples of query_block): a context-parallel rank's two chunks in one
    launch.

    Tuning (defaults from the H100 sweeps of ``bench/tune.py`` / ``bench/tune_select_dot.py``, docs/kernels.md;
    softmax score: transposed pass 2 on 64-block tiles, pass 1 on 32-block tiles, 21% faster than the earlier
    default (32-block tiles, not transposed) at 32k-128k with the same selections, H100, config (a)):
    softmax score: ``block_n`` blocks per tile, ``num_warps``, ``num_stages``, ``ftz_exp2`` (opt-in, CUDA
    only, see ``_exp2``); opt-in variants that give the same selections up to fp32 summation order (timed
    against the default by ``bench/tune.py --stages select_variants``):
    ``lse_mode`` pass 1: "online" (running max), "offset" (fixed per-row offset, elementwise accumulation,
    ``_row_lse2_offset``), "offset_t" (the same on transposed tiles); ``lse_block_n`` pass 1's tile width
    (None: ``block_n``); ``transposed`` pass 2 on s^T tiles (``_group_sum``); ``topk_prefilter`` an fp32
    test before the int64 top-k insertion (``_topk_insert_prefiltered``); ``pipelined`` the next tile's dot
    in flight during this tile's exponentials, both passes (``_row_lse2_pipelined``; groups of <= 128 rows);
    ``max_registers`` caps the registers per thread (Triton's ``maxnreg``, CUDA only): 168 fits 3 programs of 4
    warps per SM, which the pipelined loops (~195-225 registers) otherwise drop to 2; ``max_rows`` rows per
    program (128: one group of config (a); 256 puts two query groups in a program, which then streams the
    representatives once for both: half the L2 traffic).
    Dot score: ``dot_groups`` query groups per program, ``dot_block_n`` blocks per tile,
    ``dot_tensor_cores`` (False: an fp32 FMA dot, same selections, slower)."""
    import torch

    b, L, hq, d = q.shape
    hk = rep.shape[1]
    G = hq // hk
    B = params.query_block
    n_groups_max = -(-(max_n - qoff) // B)
    half = q.dtype in (torch.bfloat16, torch.float16)
    if params.score == "dot_group_sum":
        dot_select_launch(q, rep, seq, max_n, params, topk, sel, qoff=qoff, pieces=pieces, groups=dot_groups,
                          block_n=dot_block_n, tensor_cores=dot_tensor_cores)
        return
    meta, options = softmax_select_meta(
        G, B, d, topk, params.block_size, half, q.is_cuda, block_n=block_n, num_warps=num_warps,
        num_stages=num_stages, ftz_exp2=ftz_exp2, lse_mode=lse_mode, lse_block_n=lse_block_n, transposed=transposed,
        topk_prefilter=topk_prefilter, pipelined=pipelined, max_registers=max_registers, max_rows=max_rows)
    qrow2, qoff2 = pieces or (NO_SECOND_PIECE, 0)
    _select_kernel[(program_count(n_groups_max, L, B, meta["NG"], pieces), seq.shape[0], hk)](
        q, rep, seq, lsebuf, sel,
        q.stride(0), q.stride(1), q.stride(2), sel.stride(0), sel.stride(1), sel.stride(2), L, hq, hk,
        params.scale(d) * 1.4426950408889634, params.n_init, params.local_window, topk, qoff, qrow2, qoff2, **meta,
        **options,
    )
