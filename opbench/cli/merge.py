"""Verb ``merge``: one result file from the shard files of a sharded run (``--shard I/N``)."""

from __future__ import annotations

from pathlib import Path

from opbench.errors import UsageError


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "merge", help="merge the result files of the shards of one run into one file",
        description="Merge the JSON Lines files written by `--shard I/N` runs into one file for"
        " `opbench report` and `opbench gate`.  Refuses a result present in two files, records"
        " of a case outside its file's shard, and names the shards that are missing.")
    p.add_argument("files", nargs="+", metavar="SHARD.jsonl", help="one file per shard")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="merged file (replaced)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from opbench.harness.shards import MergeError, merge_shards
    from opbench.harness.store import ResultFileError, ResultWriter

    out = Path(args.out)
    if any(out.resolve() == Path(f).resolve() for f in args.files):
        raise UsageError(f"-o {out} is one of the inputs; write the merged file elsewhere")
    try:
        records = merge_shards(args.files)
    except (MergeError, ResultFileError) as exc:
        raise UsageError(str(exc)) from None
    if out.exists():
        out.unlink()
    with ResultWriter(out) as writer:
        for record in records:
            writer.write(record)
    shards = len({r["shard"] for r in records})
    print(f"merged {len(records)} records of {shards} shard(s) into {out}")
    return 0
