"""Write a per-file SHA-256 manifest for a dataset folder.

Usage: python scripts/make_manifest.py DIR OUT [--name NAME]

Example (regenerates the shipped Kvasir-SEG manifest):
    python scripts/make_manifest.py /work/shared/datasets/kvasir-seg \
        src/polypseg/data/manifests/kvasir-seg.sha256.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(root: Path, name: str) -> dict:
    """Manifest dict for every regular file under ``root`` (POSIX relative paths)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"dataset": name, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="dataset root folder")
    parser.add_argument("out", type=Path, help="output JSON file")
    parser.add_argument("--name", default=None, help="dataset name (default: DIR's folder name)")
    args = parser.parse_args()
    root = args.dir.resolve()
    manifest = build_manifest(root, args.name or root.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(manifest['files'])} entries to {args.out}")


if __name__ == "__main__":
    main()
