"""A damaged file is a warning, not a stop: trunk caches, teacher caches and resume state that cannot be
read are computed again with one line naming the file; where a stage must not rebuild another stage's
output, one error names the file and the command that brings it back."""

import shutil

import pytest
import torch
from conftest import loss_config, medpix_data

import medkd.engine.trunks as trunks
from medkd.config.configs import ModelConfig, TrainConfig
from medkd.engine.loop import Distillation, TeacherSource, distill_student, train_teacher
from medkd.engine.teacher_cache import load_or_build_teacher_cache
from medkd.models.checkpoint import read_checkpoint
from medkd.pipeline.paths import Paths, rebuild_teacher
from medkd.stages.distill import distill_stage
from medkd.util.stored import UnreadableFile

TEACHER = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=24, fusion_heads=2, dropout=0.1,
                      vision_train_blocks=1, text_train_blocks=0)
STUDENT = ModelConfig("tiny-vit", "tiny-bert", fusion_dim=16, fusion_heads=2, vision_train_blocks=0,
                      text_train_blocks=0)
FAST = TrainConfig(epochs=2, batch_size=8, eval_batch_size=16, lr=1e-3, seed=7, precision="fp32")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return medpix_data(tmp_path_factory.mktemp("medpix"), sizes=(24, 8, 8), max_length=24)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    return train_teacher(data, TEACHER, FAST, folder, trunk_dir=folder / "trunks"), folder


def test_a_damaged_trunk_file_is_computed_again(teacher, data, tmp_path, capsys, monkeypatch):
    run, folder = teacher
    monkeypatch.setattr(trunks, "_memory", type(trunks._memory)())  # read from disk, not this process's memory
    files = sorted((folder / "trunks").glob("*.pt"))
    assert files
    truncate(files[0])
    again = train_teacher(data, TEACHER, FAST, tmp_path / "again", trunk_dir=folder / "trunks")
    err = capsys.readouterr().err
    assert f"trunk cache file {files[0]} cannot be read" in err and "computed again" in err
    assert again.dev == run.dev  # the same trunk outputs, computed afresh
    assert torch.load(files[0], weights_only=True)["key"]  # and stored whole again


def test_a_damaged_teacher_cache_is_rebuilt_or_named_with_what_to_run(teacher, data, tmp_path, capsys):
    run, _ = teacher
    path = tmp_path / "cache.pt"
    first = load_or_build_teacher_cache(run.checkpoint, data, FAST, path)
    truncate(path)
    rebuilt = load_or_build_teacher_cache(run.checkpoint, data, FAST, path)
    assert f"teacher cache {path} cannot be read" in capsys.readouterr().err
    assert rebuilt["key"] == first["key"] and torch.equal(rebuilt["outputs"]["fused"], first["outputs"]["fused"])
    truncate(path)
    with pytest.raises(UnreadableFile, match=rf"teacher cache {path} cannot be read .*; to restore or rebuild it: "
                                             r"`dvc repro -f teacher@medpix`"):
        load_or_build_teacher_cache(run.checkpoint, data, FAST, path, rebuild_stale=False,
                                    rebuild_with="`dvc repro -f teacher@medpix`")


def test_a_damaged_resume_file_starts_the_run_afresh(teacher, data, tmp_path, capsys):
    run, _ = teacher
    state = tmp_path / "state.pt"
    state.write_bytes(b"PK\x03\x04 not a whole zip")
    result = distill_student(data, Distillation(STUDENT, loss_config({"ce": 1.0}), FAST, tmp_path / "s",
                                                TeacherSource(run.checkpoint), resume_path=state))
    assert f"resume state {state} cannot be read" in capsys.readouterr().err
    assert len(result.history) == FAST.epochs


def test_a_damaged_checkpoint_is_named(teacher, tmp_path):
    run, _ = teacher
    copy = tmp_path / "model.pt"
    shutil.copy(run.checkpoint, copy)
    truncate(copy)
    with pytest.raises(UnreadableFile, match=rf"^{copy} cannot be read \("):
        read_checkpoint(copy)


def test_a_stage_names_another_stages_damaged_output_and_the_command_that_restores_it(project):
    root, params = project
    paths = Paths(root)
    cache = paths.teacher_cache("medpix")
    saved = cache.read_bytes()
    try:
        truncate(cache)
        with pytest.raises(UnreadableFile) as err:
            distill_stage(params, "tiny-a", root)
        assert str(err.value).startswith(f"teacher cache {cache} cannot be read (")
        assert str(err.value).endswith("to restore or rebuild it: `dvc checkout models/medpix/teacher_cache.pt` "
                                       "(DVC's own copy) or `dvc repro -f teacher@medpix`")
        assert rebuild_teacher(paths, "medpix") in str(err.value)
    finally:
        cache.write_bytes(saved)
