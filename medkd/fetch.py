"""Fill `data/` with the raw data sets in their published layouts (then `dvc add data`).

Offline: copied from a local mirror (`--mirror`, or $MEDKD_DATA_MIRROR) holding
`medpix-2.0/` and `wound-1-0/`. Online: downloaded from the public GitHub repositories at
pinned commits. A data set already present is left alone (use --force to replace it).

    python -m medkd.fetch --dest data --mirror ../shared/data
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str  # folder under data/
    repo: str
    commit: str
    folder: str  # folder inside the repository
    marker: str  # a file that a complete copy has


SOURCES = (
    Source("medpix-2.0", "CHILab1/MedPix-2.0", "d3bc431576ec8041114806ec3eb58d75adf45029", "MedPix-2-0",
           "Descriptions.json"),
    Source("wound-1-0", "rupeshsah2038/Multi-Modal", "e0879366d149dd398da947bc121c2ecf4d8c2eac",
           "datasets/Wound-1-0", "metadata_train.csv"),
)


def from_mirror(source: Source, mirror: Path, dest: Path) -> bool:
    origin = mirror / source.name
    if not (origin / source.marker).exists():
        return False
    _replace_with(dest, lambda tmp: shutil.copytree(origin, tmp, dirs_exist_ok=True))
    return True


def from_github(source: Source, dest: Path) -> None:
    url = f"https://codeload.github.com/{source.repo}/tar.gz/{source.commit}"
    print(f"downloading {url} ...", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=60) as response:
        payload = response.read()

    def extract(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/")  # drop GitHub's "<repo>-<commit>/" prefix
                if not rest.startswith(source.folder + "/") or not member.isfile():
                    continue
                relative = Path(rest[len(source.folder) + 1:])
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as f, open(target, "wb") as out:
                    shutil.copyfileobj(f, out)
        if not (tmp / source.marker).exists():
            raise RuntimeError(f"{url}: no {source.folder}/{source.marker} in the archive")

    _replace_with(dest, extract)


def _replace_with(dest: Path, fill) -> None:
    """Fill a temporary sibling folder, then swap it in: never a half-copied data set."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        fill(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="data", type=Path)
    parser.add_argument("--mirror", default=os.environ.get("MEDKD_DATA_MIRROR"), type=lambda s: Path(s) if s else None)
    parser.add_argument("--online", action="store_true", help="download when the mirror lacks a data set")
    parser.add_argument("--force", action="store_true", help="replace data sets already present")
    args = parser.parse_args(argv)
    missing = []
    for source in SOURCES:
        dest = args.dest / source.name
        if (dest / source.marker).exists() and not args.force:
            print(f"{dest}: present")
            continue
        if args.mirror and from_mirror(source, args.mirror, dest):
            print(f"{dest}: copied from {args.mirror / source.name}")
        elif args.online:
            from_github(source, dest)
            print(f"{dest}: downloaded from github.com/{source.repo}@{source.commit[:8]}")
        else:
            missing.append(source)
    for source in missing:
        print(f"{args.dest / source.name}: not found in mirror {args.mirror}; run with --online to download "
              f"github.com/{source.repo}/tree/{source.commit}/{source.folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
