import hashlib
import io
import tarfile
import urllib.error

import numpy as np
import pytest
from PIL import Image

import medkd.data.fetch as fetch
from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.data.fetch import main

COMMIT = "d3bc431576ec8041114806ec3eb58d75adf45029"


def test_mirror_copy_then_present_data_is_left_alone(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    make_synthetic_medpix(mirror / "medpix-2.0", sizes=(4, 2, 2), image_size=8)
    make_synthetic_wound(mirror / "wound-1-0", sizes=(4, 2, 2), image_size=8)
    dest = tmp_path / "data"
    assert main(["--dest", str(dest), "--mirror", str(mirror)]) == 0
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    original = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert copied == original
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temporary folders left
    (dest / "medpix-2.0" / "marker-of-a-local-edit").write_text("kept")
    main(["--dest", str(dest), "--mirror", str(mirror)])
    assert (dest / "medpix-2.0" / "marker-of-a-local-edit").exists()
    assert "medpix-2.0: present" in capsys.readouterr().out


def test_a_missing_data_set_is_a_failure_that_says_how_to_get_it(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    make_synthetic_wound(mirror / "wound-1-0", sizes=(4, 2, 2), image_size=8)
    assert main(["--dest", str(tmp_path / "data"), "--mirror", str(mirror)]) == 1
    err = capsys.readouterr().err
    assert "medpix-2.0: not in the mirror" in err and "--online" in err and "missing data set(s): medpix" in err
    assert not (tmp_path / "data" / "medpix-2.0").exists()
    assert (tmp_path / "data" / "wound-1-0" / "metadata_train.csv").exists()


def test_offline_download_fails_in_one_line_naming_the_mirror_variable(tmp_path, capsys, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", no_network)
    assert main(["--dest", str(tmp_path / "data"), "--mirror", "", "--online"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "cannot download" in line]
    assert len(lines) == 2 and all("MEDKD_DATA_MIRROR" in line for line in lines)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def _reference_mirror_form(img: Image.Image) -> bytes:
    """The mirror's form, written out independently: composite on black, gray when channels agree,
    Lanczos to a longer side of 256, optimised PNG."""
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    array = np.asarray(img)
    if array.ndim == 3 and (array == array[..., :1]).all():
        img = Image.fromarray(array[..., 0])
    w, h = img.size
    if max(w, h) > 256:
        img = img.resize((round(w * 256 / max(w, h)), round(h * 256 / max(w, h))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


@pytest.fixture
def github(tmp_path, monkeypatch):
    """A stand-in for codeload.github.com: MedPix at full size (RGBA, gray-as-RGB and colour images)."""
    original = make_synthetic_medpix(tmp_path / "original", sizes=(6, 2, 2), image_size=32)
    rng = np.random.default_rng(0)
    images = sorted((original / "images").glob("*.png"))
    for i, path in enumerate(images):
        gray = rng.integers(0, 255, (512, 384), dtype=np.uint8)
        if i % 3 == 0:
            img = Image.fromarray(np.dstack([gray, gray, gray, rng.integers(0, 255, gray.shape, dtype=np.uint8)]))
        elif i % 3 == 1:
            img = Image.fromarray(np.dstack([gray] * 3))
        else:
            img = Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8))
        img.save(path)
    expected = {p.stem: hashlib.sha256(_reference_mirror_form(Image.open(p))).hexdigest() for p in images}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(original, arcname=f"MedPix-2.0-{COMMIT}/MedPix-2-0")
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue()))
    return expected


def _manifests(folder, expected, change=None):
    folder.mkdir(parents=True)
    rows = ["index,image_id,image_sha256"] + [f"{i},{k},{change(v) if change else v}"
                                              for i, (k, v) in enumerate(expected.items())]
    (folder / "manifest_train.csv").write_text("\n".join(rows) + "\n")


def test_online_copy_is_brought_to_the_mirrors_form_and_verified(tmp_path, github, capsys):
    _manifests(tmp_path / "manifests" / "medpix", github)
    dest = tmp_path / "data"
    code = main(["--dest", str(dest), "--mirror", "", "--online", "--manifests", str(tmp_path / "manifests")])
    assert code == 1  # Wound-1-0's download was not served by the stand-in; MedPix was
    images = {p.stem: p for p in (dest / "medpix-2.0" / "images").glob("*.png")}
    assert {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in images.items()} == github
    assert max(Image.open(next(iter(images.values()))).size) == 256
    assert "medpix-2.0: downloaded from github.com/CHILab1/MedPix-2.0@d3bc4315" in capsys.readouterr().out


def test_a_download_that_differs_from_the_manifests_is_refused(tmp_path, github, capsys):
    _manifests(tmp_path / "manifests" / "medpix", github, change=lambda h: h[::-1])
    dest = tmp_path / "data"
    main(["--dest", str(dest), "--mirror", "", "--online", "--manifests", str(tmp_path / "manifests")])
    assert "10 of 10 downloaded images differ from the study's manifests" in capsys.readouterr().err
    assert not (dest / "medpix-2.0").exists()  # never installed
