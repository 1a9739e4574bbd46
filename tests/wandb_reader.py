"""Read the history rows of a W&B *offline* run file (``run-<id>.wandb``) without network or a server.

wandb >= 0.30 offline mode writes neither ``wandb-summary.json`` nor a readable history; the run file is
a LevelDB-log stream (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a 7-byte
crc/length/type header) of ``wandb_internal_pb2.Record`` protobufs. Tests use this to check what was
really logged to W&B.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            break


def read_history(run_file: str | Path) -> list[dict]:
    """All history rows logged to the run, in order, as {key: value} dicts (``_step`` included)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def find_run_file(run_dir: str | Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no W&B offline run under {run_dir}/wandb")
    return files[-1]
