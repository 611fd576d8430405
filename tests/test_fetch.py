from medkd.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.fetch import main


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


def test_mirror_without_a_data_set_says_how_to_get_it(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    make_synthetic_wound(mirror / "wound-1-0", sizes=(4, 2, 2), image_size=8)
    main(["--dest", str(tmp_path / "data"), "--mirror", str(mirror)])
    err = capsys.readouterr().err
    assert "medpix-2.0: not found in mirror" in err and "--online" in err
    assert not (tmp_path / "data" / "medpix-2.0").exists()
    assert (tmp_path / "data" / "wound-1-0" / "metadata_train.csv").exists()
