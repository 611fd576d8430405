"""One teacher and one distillation run on synthetic data, in one process or as one rank under
torchrun; tests/test_distributed.py runs it both ways and compares.

    python tests/ddp_run.py OUT DATA
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_run.py OUT DATA
"""

import sys
from pathlib import Path

import dataclasses

import torch

from medkd.backbones import BACKBONES, register_backbone
from medkd.data import DataConfig, PreparedData
from medkd.distributed import init_from_env, rank
from medkd.losses import LossConfig
from medkd.models import ModelConfig
from medkd.train import TrainConfig, distill_student, train_teacher

# No dropout anywhere (fusion, and BERT's own): one process and N processes then compute the same
# function of the same batches.
_TINY_BERT = BACKBONES.get("tiny-bert")
register_backbone(dataclasses.replace(_TINY_BERT, name="tiny-bert-nodrop", arch_kwargs={
    **_TINY_BERT.arch_kwargs, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
TEACHER = ModelConfig("tiny-vit", "tiny-bert-nodrop", fusion_dim=24, fusion_heads=2, dropout=0.0)
STUDENT = ModelConfig("tiny-vit", "tiny-bert-nodrop", fusion_dim=16, fusion_layers=2, fusion_heads=2, dropout=0.0)
# 32 training samples in batches of 5: the last global batch (2) splits unevenly over 2 ranks.
CFG = TrainConfig(epochs=2, batch_size=5, eval_batch_size=16, lr=1e-3, seed=7, bf16=False, device="cpu")
LOSS = LossConfig(weights={"ce": 1.0, "kl": 0.5, "mse": 2.0, "crd": 0.5}, nce_k=8)


def main(out: Path, data_root: Path) -> None:
    init_from_env("cpu")
    torch.set_num_threads(1)
    data = PreparedData.load(DataConfig("medpix", str(data_root), image_size=32, max_length=32))
    teacher = train_teacher(data, TEACHER, CFG, out / "teacher")
    student = distill_student(data, teacher.checkpoint, STUDENT, LOSS, CFG, out / "student",
                              cache_path=out / "cache.pt", resume_path=out / "state" / "student.pt")
    torch.save({"teacher_history": teacher.history, "student_history": student.history, "dev": student.dev,
                "test": student.test}, out / f"rank{rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
