"""Read wandb's offline run files (``run-<id>.wandb``) back: what a ``wandb sync`` would upload.

The file is wandb's record log: a 7-byte header (``:W&B``, magic, version) then 32 KiB blocks of chunks, each with
a 7-byte header (CRC-32, length, type: 1 full, 2 first, 3 middle, 4 last); a record is one ``Record`` protobuf."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, buf, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if n == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        buf += data[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@dataclass
class OfflineRun:
    run_id: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # one dict per logged step, with "_step"


def read_run(folder: Path) -> OfflineRun:
    """The run, its tags and every logged history row of one ``offline-run-*`` folder."""
    (path,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.name = rec.run.run_id, rec.run.run_group, rec.run.display_name
            run.tags = list(rec.run.tags)
        elif kind == "history":
            run.history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return run


def assert_history_is_metrics(folder: Path, metrics_jsonl: Path) -> None:
    """The offline run logged every step of ``metrics.jsonl`` exactly once, with its values (a step's several
    records, e.g. its training metrics and its evaluation, are one wandb row)."""
    rows = read_run(folder).history
    steps = [r["_step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    want: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        want.setdefault(rec.pop("step"), {}).update(rec)
    assert steps == sorted(want), (steps, sorted(want))
    for row in rows:
        for key, value in want[row["_step"]].items():
            if isinstance(value, float) and value != value:  # NaN
                continue
            assert row.get(key) == value, (row["_step"], key, row.get(key), value)
