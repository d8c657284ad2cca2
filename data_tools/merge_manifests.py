"""Merge the per-slice manifests of a Slurm array conversion into one manifest.json.

    python -m data_tools.merge_manifests OUT          # OUT/part-00000 ... OUT/part-NNNNN
    python -m data_tools.merge_manifests s3://bucket/ds   # OUT may be any fsspec URL

Each array task ran ``python -m data_tools.convert ... --output OUT --slice-index I
--slice-count N`` and left a finished shard folder ``OUT/part-0000I/``. This checks that all N
slices finished with the same settings, then writes ``OUT/manifest.json`` listing every shard as
``part-0000I/NNNNN.tar`` (in slice order, so the sample order is the input order), with summed
counts, plus ``classnames.txt`` / ``zeroshot_classification_templates.txt`` when the slices have
them. Exit 2 with one ``error:`` line when a slice is missing or unfinished
(launch/convert_slurm.sh runs this after the array).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge import cli
from data_tools import shards, store

SIDECARS = ("classnames.txt", "zeroshot_classification_templates.txt")
# Arguments that legitimately differ between the slices of one conversion.
PER_SLICE_ARGS = {"slice_index", "processes", "threads", "chunk_rows", "timeout", "retries"}
PER_SLICE_ARGS |= {"work_dir"}  # each task's own local scratch


class MergeError(ValueError):
    """Reported as one ``error:`` line, exit 2."""


def _settings(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest["args"].items() if k not in PER_SLICE_ARGS}


def read_parts(out: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, manifest) per slice, in slice order; every slice must be finished."""
    entries = store.listing(out)  # one request per 1,000 names on an object store
    folders = sorted(n for n, e in entries.items() if n.startswith("part-") and e["type"] != "file")
    if not folders:
        raise MergeError(f"{out}: no part-* folders (run the conversion with --slice-count)")
    parts = []
    for folder in folders:
        if store.read_if_exists(store.join(out, folder, shards.MANIFEST_NAME)) is None:
            raise MergeError(
                f"{store.join(out, folder)} has no manifest.json: that slice has not finished"
            )
        parts.append((folder, shards.read_manifest(store.join(out, folder))))
    count = parts[0][1].get("slice", {}).get("count")
    indices = [m.get("slice", {}).get("index") for _, m in parts]
    if count is None or indices != list(range(count)):
        missing = sorted(set(range(count or 0)) - set(indices))
        raise MergeError(f"{out}: expected slices 0..{(count or 1) - 1}, missing {missing}")
    first = _settings(parts[0][1])
    for name, manifest in parts[1:]:
        if _settings(manifest) != first:
            raise MergeError(f"{out}/{name} was converted with other settings than part-00000")
    return parts


def merge(out: str | Path) -> dict[str, Any]:
    parts = read_parts(out)
    infos, reports = [], []
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for name, manifest in parts:
        for s in manifest["shards"]:
            infos.append(
                shards.ShardInfo(f"{name}/{s['name']}", s["samples"], s["bytes"], s["sha256"])
            )
        reports += [f"{name}/{r}" for r in manifest.get("reports", [])]
        status.update(manifest.get("status", {}))
        reasons.update(manifest.get("failure_reasons", {}))
    args = {k: v for k, v in parts[0][1]["args"].items() if k != "slice_index"}
    manifest = shards.new_manifest(
        infos,
        sum(m["failed"] for _, m in parts),
        args,
        parts[0][1]["tool_version"],
        rows=sum(m.get("rows", 0) for _, m in parts),
        status=dict(status),
        failure_reasons=dict(sorted(reasons.items())),
        reports=reports,
        slices=[name for name, _ in parts],
    )
    for sidecar in SIDECARS:
        data = store.read_if_exists(store.join(out, parts[0][0], sidecar))
        if data is not None:
            shards.write_bytes(store.join(out, sidecar), data)
    shards.write_manifest(out, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m data_tools.merge_manifests", description=__doc__.split("\n")[0]
    )
    p.add_argument("output", help="the --output folder or URL of the array tasks")
    args = p.parse_args(argv)
    try:
        manifest = merge(args.output)
    except (MergeError, OSError, ValueError) as e:  # StoreError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"merged {len(manifest['slices'])} slices: {manifest['samples']} samples in "
        f"{len(manifest['shards'])} shards -> {store.join(args.output, shards.MANIFEST_NAME)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
