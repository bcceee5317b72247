"""Where finished rows go: ``DIR/images/<id>.png``, or webdataset tar shards ``DIR/shards/``.

``put(done)`` returns the records that are now durable (their manifest lines may be written);
``close()`` returns those of a last partial shard. Both write through durable.write_atomic.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

from musefast.batch.durable import remove_temporaries, write_atomic
from musefast.batch.worker import Done

FORMATS = ("png", "webdataset")
_SHARD = re.compile(r"^shard-(\d{6})\.tar$")


def _finish(done: Done, file: str, **extra) -> dict:
    return {**done.record, "file": file, **extra, "sha256": hashlib.sha256(done.png).hexdigest()}


class ImageSink:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.folder = out_dir / "images"
        self.folder.mkdir(parents=True, exist_ok=True)

    def prepare(self, manifest_files: set[str]) -> None:
        """Drop temporaries of a crashed run. Images without a manifest line are overwritten
        when their row is generated again (same row, same bytes)."""
        remove_temporaries(self.folder)

    def put(self, done: Done) -> list[dict]:
        write_atomic(self.folder / f"{done.record['id']}.png", done.png)
        return [_finish(done, f"images/{done.record['id']}.png")]

    def close(self) -> list[dict]:
        # every row is finished: what is left under a temporary name is a killed Ray actor's
        # half-written image (its row was generated again elsewhere)
        remove_temporaries(self.folder)
        return []


class ShardSink:
    """WebDataset tar shards of at most ``shard_size`` rows: members ``<id>.png`` and ``<id>.json``
    (the record). A shard is renamed into place complete, then its rows' lines are written; a
    shard whose lines never made it (a crash in between) is removed by the next run."""

    def __init__(self, out_dir: Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.shard_size = out_dir, shard_size
        self.folder = out_dir / "shards"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: list[Done] = []
        self.next_index = 0

    def prepare(self, manifest_files: set[str]) -> None:
        remove_temporaries(self.folder)
        indices = [-1]
        for p in self.folder.iterdir():
            m = _SHARD.match(p.name)
            if not m:
                continue
            if f"shards/{p.name}" not in manifest_files:
                p.unlink()  # its rows have no manifest line: they are generated again
            else:
                indices.append(int(m.group(1)))
        self.next_index = max(indices) + 1

    def put(self, done: Done) -> list[dict]:
        self.pending.append(done)
        return self._write() if len(self.pending) >= self.shard_size else []

    def close(self) -> list[dict]:
        return self._write() if self.pending else []

    def _write(self) -> list[dict]:
        name = f"shard-{self.next_index:06d}.tar"
        self.next_index += 1
        records = [_finish(d, f"shards/{name}", member=f"{d.record['id']}.png") for d in self.pending]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for done, record in zip(self.pending, records):
                meta = {k: v for k, v in record.items() if k not in ("file", "member")}
                _add(tar, f"{record['id']}.png", done.png)
                _add(tar, f"{record['id']}.json", json.dumps(meta, ensure_ascii=False).encode())
        write_atomic(self.folder / name, buf.getvalue())
        self.pending = []
        return records


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no clock: the same rows give the same shard
    tar.addfile(info, io.BytesIO(data))


def make_sink(fmt: str, out_dir: Path, shard_size: int):
    if fmt == "png":
        return ImageSink(out_dir)
    if fmt == "webdataset":
        return ShardSink(out_dir, shard_size)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
