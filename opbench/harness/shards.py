"""Sharded suites: a stable split of a case table by case id, and merging the shards' results.

A case belongs to shard ``1 + sha256(case id) mod N`` (1-based, as CI matrices count).  The id
alone decides, never the case's position in the table, so adding or removing cases never moves
the others between shards, and every machine computes the same split.  The N shards are
disjoint and their union is the whole table.  Records written under ``--shard i/N`` carry
``"shard": "i/N"``, so ``merge`` can refuse overlaps and name the shards that are missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .store import read_records

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 1..count
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, case_id: str) -> bool:
        return shard_of(case_id, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """``"2/5"`` -> Shard(2, 5); ValueError naming what is wrong otherwise."""
    index, slash, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count)) if slash else None
    except ValueError:
        shard = None
    if shard is None or shard.count < 1 or not 1 <= shard.index <= shard.count:
        raise ValueError(f"--shard {text!r} must be I/N with 1 <= I <= N, e.g. 1/3")
    return shard


def shard_of(case_id: str, count: int) -> int:
    """The 1-based shard of ``case_id`` among ``count`` (the same on every machine)."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def take_shard(items: Sequence[T], shard: Shard | None, key=lambda item: item.id) -> list[T]:
    """The items of ``shard`` (all of them when ``shard`` is None), in their original order."""
    if shard is None:
        return list(items)
    return [item for item in items if shard.holds(key(item))]


class MergeError(ValueError):
    """Shard files that do not make one whole run; the message says which and why."""


def merge_shards(paths: Iterable[str | Path]) -> list[dict]:
    """Every record of the shard files, checked: each file holds one shard of the same N, no
    shard comes twice, every record belongs to its file's shard (so no result is in two files)
    and no shard is missing."""
    shard_file: dict[str, str] = {}
    counts: set[int] = set()
    merged: list[dict] = []
    for path in map(str, paths):
        records = read_records(path)
        shard = _file_shard(path, records)
        if str(shard) in shard_file:
            raise MergeError(f"shard {shard} appears twice: {shard_file[str(shard)]} and {path}")
        shard_file[str(shard)] = path
        counts.add(shard.count)
        for record in records:
            _check_record(path, shard, record)
        merged += records
    if len(counts) > 1:
        raise MergeError(f"the files split the suite differently (N = "
                         f"{', '.join(map(str, sorted(counts)))}); merge shards of one run")
    count = counts.pop() if counts else 0
    missing = [f"{i}/{count}" for i in range(1, count + 1) if f"{i}/{count}" not in shard_file]
    if missing:
        raise MergeError(f"missing shard(s) {', '.join(missing)}")
    return merged


def _file_shard(path: str, records: list[dict]) -> Shard:
    shards = {r.get("shard") for r in records}
    if not records:
        raise MergeError(f"{path}: no records")
    if None in shards:
        raise MergeError(f"{path}: records without a shard; write them with --shard I/N")
    if len(shards) > 1:
        raise MergeError(f"{path}: records of several shards ({', '.join(sorted(shards))})")
    try:
        return parse_shard(shards.pop())
    except ValueError as exc:
        raise MergeError(f"{path}: {exc}") from None


def _check_record(path: str, shard: Shard, record: dict) -> None:
    """A record outside its file's shard overlaps the shard that owns it (a file relabelled,
    or shards of different selections): refused, naming both."""
    if not shard.holds(record["case_id"]):
        raise MergeError(f"overlap: {path} (shard {shard}) holds {record['case_id']}, which "
                         f"belongs to shard {shard_of(record['case_id'], shard.count)}/"
                         f"{shard.count}")
