"""CP=2 against CP=1 over gloo, both modes, through ``tests/workers/cp_exactness.py`` (the worker the GPU test
runs at real shapes): outputs, dq and the selected blocks themselves, dk / dv.

The packed-document case pins down the chunk-boundary question. With ``data.reset_attention_mask=true`` query
groups are document-local, so with query_block > 1 a group can straddle a CP chunk boundary: documents start at
71 and 133, chunks at 64, 128 and 192, query_block 4, so the boundaries at 128 and 192 cut a group whose selection
has real choices, while the prefix [0, 64) holds no document start and runs without neighbours. A group's
selection sums over all its rows, so a chunk run on its own rows only (zero-padded, what the path did before)
selects differently -- the worker checks that zeroing those rows does change the CP=1 selection in this layout
-- and the CP path must still equal CP=1 exactly: it runs each chunk with the query_block - 1 real query rows
on either side.
"""
import json

import pytest

from tests.helpers import torchrun


@pytest.mark.slow
@pytest.mark.parametrize("docs", [[], [71, 133]], ids=["one-sequence", "packed-documents-straddling"])
def test_cp2_equals_cp1_selections_included(tmp_path, docs):
    pytest.importorskip("deepspeed")
    out = tmp_path / "res"
    torchrun(2, ["tests/workers/cp_exactness.py", "--out", str(out), "--tiny", "--query-block", "4",
                 "--modes", "allgather", "ulysses", *(["--doc-starts", *map(str, docs)] if docs else [])])
    rows = [json.loads(x) for r in range(2) for x in (tmp_path / f"res.{r}").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["ok"] and row["selection_equal"], row
        if docs:
            assert row["straddling_chunk_starts"] == 2 and row["rows_whose_selection_padding_would_change"] > 0, row
