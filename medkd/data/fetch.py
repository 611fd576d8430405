"""Fill `data/` with the raw data sets in their published layouts (then `dvc add data`).

Offline: copied from a local mirror (`--mirror`, or $MEDKD_DATA_MIRROR) holding
`medpix-2.0/` and `wound-1-0/`. Online: downloaded from the public GitHub repositories at
pinned commits, then brought to the mirror's form (MedPix-2.0: longer side at most 256 px,
Lanczos; RGBA composited onto black; images whose channels are equal stored as 8-bit
grayscale; PNG optimised) and checked against the sha256 of the committed manifests
(`reports/data/<data set>/manifest_*.csv`): a copy that differs is refused, not installed.
A data set already present is left alone (use --force to replace it). Exit status 1 when a
data set could not be had.

    python -m medkd.data.fetch --dest data --mirror ../shared/data [--online]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from medkd.catalog.dataset_specs import DATASETS, DatasetSpec
from medkd.util.files import replace_dir, sha256_file


class FetchError(RuntimeError):
    """A data set could not be downloaded or does not match what the study was run on."""


def from_mirror(spec: DatasetSpec, mirror: Path, dest: Path) -> bool:
    origin = mirror / spec.folder
    if not (origin / spec.marker).exists():
        return False
    replace_dir(dest, lambda tmp: shutil.copytree(origin, tmp, dirs_exist_ok=True))
    return True


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"cannot download {url} ({reason}); offline? Point MEDKD_DATA_MIRROR at a folder "
                         "holding medpix-2.0/ and wound-1-0/ (make data MEDKD_DATA_MIRROR=/path)") from None


def mirror_form(src: Path, max_side: int) -> None:
    """Rewrite one image in the mirror's form (see the module docstring), in place."""
    with Image.open(src) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        elif img.mode != "L":
            img = img.convert("RGB")
        if img.mode == "RGB":
            r, g, b = img.split()
            if r.tobytes() == g.tobytes() == b.tobytes():
                img = r
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        img.save(src, format="PNG", optimize=True)


def verify_manifests(folder: Path, manifests: Path) -> None:
    """Every image named in the committed manifests exists in `folder` with the recorded sha256."""
    files = sorted(manifests.glob("manifest_*.csv"))
    if not files:
        print(f"{folder.name}: no committed manifests in {manifests}; not verified", file=sys.stderr)
        return
    by_stem = {p.stem: p for p in (folder / "images").rglob("*") if p.is_file()}
    wrong, total = [], 0
    for manifest in files:
        with open(manifest, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                total += 1
                path = by_stem.get(row["image_id"])
                if path is None or sha256_file(path) != row["image_sha256"]:
                    wrong.append(row["image_id"] + ("" if path else " (missing)"))
    if wrong:
        raise FetchError(f"{len(wrong)} of {total} downloaded images differ from the study's manifests "
                         f"({manifests}), e.g. {wrong[:3]}: the source changed or was processed differently. "
                         "Use the data set's mirror copy (MEDKD_DATA_MIRROR) to reproduce the committed results.")


def from_github(spec: DatasetSpec, dest: Path, manifests: Path | None = None) -> None:
    source = spec.fetch
    url = f"https://codeload.github.com/{source.repo}/tar.gz/{source.commit}"
    print(f"downloading {url} ...", file=sys.stderr)
    payload = download(url)

    def extract(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/")  # drop GitHub's "<repo>-<commit>/" prefix
                if not rest.startswith(source.folder + "/") or not member.isfile():
                    continue
                target = tmp / rest[len(source.folder) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as f, open(target, "wb") as out:
                    shutil.copyfileobj(f, out)
        if not (tmp / spec.marker).exists():
            raise FetchError(f"{url}: no {source.folder}/{spec.marker} in the archive")
        if source.max_side:
            for image in sorted((tmp / "images").rglob("*.png")):
                mirror_form(image, source.max_side)
        if manifests is not None:
            verify_manifests(tmp, manifests)

    replace_dir(dest, extract)  # a copy that fails its checks is never installed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="data", type=Path)
    parser.add_argument("--mirror", default=os.environ.get("MEDKD_DATA_MIRROR"), type=lambda s: Path(s) if s else None)
    parser.add_argument("--online", action="store_true", help="download when the mirror lacks a data set")
    parser.add_argument("--manifests", default=Path("reports/data"), type=Path,
                        help="folder of <data set>/manifest_*.csv to verify downloads against")
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
            continue
        if not args.online or spec.fetch is None:
            where = (f"run with --online to download github.com/{spec.fetch.repo}/tree/{spec.fetch.commit}/"
                     f"{spec.fetch.folder}" if spec.fetch else "it has no public source")
            print(f"{dest}: not in the mirror ({args.mirror}); {where}", file=sys.stderr)
            missing.append(spec.name)
            continue
        try:
            from_github(spec, dest, args.manifests / spec.name)
            print(f"{dest}: downloaded from github.com/{spec.fetch.repo}@{spec.fetch.commit[:8]}")
        except FetchError as err:
            print(f"{dest}: {err}", file=sys.stderr)
            missing.append(spec.name)
    if missing:
        print(f"missing data set(s): {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
