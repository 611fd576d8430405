"""One teacher and one distillation run on synthetic data, in one process or as one rank under
torchrun; tests/test_distributed.py runs it both ways and compares.

    python tests/ddp_run.py OUT DATA
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_run.py OUT DATA
"""

import dataclasses
import sys
from pathlib import Path

import torch

from medkd.catalog.backbone_specs import BACKBONES, register_backbone
from medkd.data.prepared import DataConfig, PreparedData
from medkd.engine.loop import Distillation, TeacherSource, TrainConfig, distill_student, train_teacher
from medkd.engine.losses import LossConfig
from medkd.models.classifier import ModelConfig
from medkd.util.distributed import init_from_env, rank

# No dropout anywhere (fusion, and BERT's own): one process and N processes then compute the same
# function of the same batches.
_TINY_BERT = BACKBONES.get("tiny-bert")
register_backbone(dataclasses.replace(_TINY_BERT, name="tiny-bert-nodrop", arch_kwargs={
    **_TINY_BERT.arch_kwargs, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
# Partial fine-tuning with the trunk cache: the teacher trains its top vision block and all of its text
# encoder, the student its top text layer on a frozen (pooled) vision trunk.
TEACHER = ModelConfig("tiny-vit", "tiny-bert-nodrop", fusion_dim=24, fusion_heads=2, dropout=0.0,
                      vision_train_blocks=1)
STUDENT = ModelConfig("tiny-vit", "tiny-bert-nodrop", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.0,
                      vision_train_blocks=0, text_train_blocks=1)
# 32 training samples in batches of 5: the last global batch (2) splits unevenly over 2 ranks.
CFG = TrainConfig(epochs=2, batch_size=5, eval_batch_size=16, lr=1e-3, seed=7, precision="fp32", device="cpu")
LIVE = dataclasses.replace(CFG, trunk_cache=False)  # the frozen parts computed on every batch instead
LOSS = LossConfig.from_dict({"ce": {"weight": 1.0}, "kl": {"weight": 0.5}, "mse": {"weight": 2.0},
                             "crd": {"weight": 0.5, "nce_k": 8}})


def main(out: Path, data_root: Path) -> None:
    init_from_env("cpu")
    torch.set_num_threads(1)
    data = PreparedData.load(DataConfig("medpix", str(data_root), image_size=32, max_length=32))
    teacher = train_teacher(data, TEACHER, CFG, out / "teacher", trunk_dir=out / "trunks")
    student = distill_student(data, Distillation(STUDENT, LOSS, CFG, out / "student",
                                                 TeacherSource(teacher.checkpoint, cache_path=out / "cache.pt"),
                                                 resume_path=out / "state" / "student.pt", trunk_dir=out / "trunks"))
    teacher_live = train_teacher(data, TEACHER, LIVE, out / "teacher-live")
    student_live = distill_student(data, Distillation(STUDENT, LOSS, LIVE, out / "student-live",
                                                      TeacherSource(teacher.checkpoint, cache_path=out / "cache.pt")))
    torch.save({"teacher_history": teacher.history, "student_history": student.history, "dev": student.dev,
                "test": student.test, "teacher_live_history": teacher_live.history,
                "student_live_history": student_live.history}, out / f"rank{rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
