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
import urllib.request
from pathlib import Path

from medkd.datasets import DATASETS, DatasetSpec
from medkd.files import replace_dir


def from_mirror(spec: DatasetSpec, mirror: Path, dest: Path) -> bool:
    origin = mirror / spec.folder
    if not (origin / spec.marker).exists():
        return False
    replace_dir(dest, lambda tmp: shutil.copytree(origin, tmp, dirs_exist_ok=True))
    return True


def from_github(spec: DatasetSpec, dest: Path) -> None:
    source = spec.fetch
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
        if not (tmp / spec.marker).exists():
            raise RuntimeError(f"{url}: no {source.folder}/{spec.marker} in the archive")

    replace_dir(dest, extract)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="data", type=Path)
    parser.add_argument("--mirror", default=os.environ.get("MEDKD_DATA_MIRROR"), type=lambda s: Path(s) if s else None)
    parser.add_argument("--online", action="store_true", help="download when the mirror lacks a data set")
    parser.add_argument("--force", action="store_true", help="replace data sets already present")
    args = parser.parse_args(argv)
    missing = []
    for spec in DATASETS.values():
        dest = args.dest / spec.folder
        if (dest / spec.marker).exists() and not args.force:
            print(f"{dest}: present")
            continue
        if args.mirror and from_mirror(spec, args.mirror, dest):
            print(f"{dest}: copied from {args.mirror / spec.folder}")
        elif args.online and spec.fetch is not None:
            from_github(spec, dest)
            print(f"{dest}: downloaded from github.com/{spec.fetch.repo}@{spec.fetch.commit[:8]}")
        else:
            missing.append(spec)
    for spec in missing:
        where = (f"run with --online to download github.com/{spec.fetch.repo}/tree/{spec.fetch.commit}/"
                 f"{spec.fetch.folder}" if spec.fetch else "it has no public source")
        print(f"{args.dest / spec.folder}: not found in mirror {args.mirror}; {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
