
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import loss_config, tiny_model

from medkd.config.loss_terms import LOSS_TERMS, LossConfig, TermConfig
from medkd.engine.losses import CombinedLoss, CRDLoss, FeatureMSELoss, LossContext, kd_kl_loss, term_module


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_kd_kl_matches_hand_computation():
    s = np.array([[2.0, 1.0, 0.5], [0.1, -1.0, 3.0]])
    t = np.array([[1.5, 0.0, 1.0], [2.0, 2.0, -2.0]])
    T = 3.19
    p, q = _softmax(t / T), _softmax(s / T)
    expected = (p * (np.log(p) - np.log(q))).sum(axis=1).mean() * T**2
    got = kd_kl_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_zero_when_equal_and_softening_example():
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    assert kd_kl_loss(logits, logits, 3.19).item() == pytest.approx(0.0, abs=1e-7)
    # The study's softening example prints [0.659, 0.242, 0.099] (T=1) and [0.449, 0.314, 0.237]
    # (T=3.19) for softmax([2, 1, .5] / T); the correct values are these.
    soft = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 3.19, dim=0)
    torch.testing.assert_close(soft, torch.tensor([0.4245, 0.3103, 0.2652]), atol=1e-4, rtol=0)
    sharp = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), dim=0)
    torch.testing.assert_close(sharp, torch.tensor([0.629, 0.231, 0.140]), atol=1e-3, rtol=0)


def test_kd_kl_does_not_reach_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_kl_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def _outputs(b=6, img=12, txt=10, proj=8, fused=8, classes=(2, 5), seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"logits_modality": classes[0], "logits_location": classes[1], "img_raw": img,
              "txt_raw": txt, "img_proj": proj, "txt_proj": proj, "fused": fused}
    return {k: torch.randn(b, d, generator=g).requires_grad_(grad) for k, d in shapes.items()}


def test_fixed_projection_mse_matches_hand_computation_and_is_not_trained():
    loss = FeatureMSELoss(12, 10, 8, projection="fixed", seed=3)
    assert list(loss.parameters()) == []
    s, t = _outputs(seed=1), _outputs(seed=2)
    w_img, w_txt = loss.proj_img.weight, loss.proj_txt.weight
    # Orthogonal: W Wᵀ = I for a wide map (8 x 12), so the target keeps the teacher's scale.
    torch.testing.assert_close(w_img @ w_img.T, torch.eye(8), atol=1e-5, rtol=0)
    expected = ((s["img_proj"] - t["img_raw"] @ w_img.T) ** 2).mean() + (
        (s["txt_proj"] - t["txt_raw"] @ w_txt.T) ** 2).mean()
    torch.testing.assert_close(loss(s, t), expected)
    # Same seed, same map: the fixed target is reproducible across runs.
    torch.testing.assert_close(FeatureMSELoss(12, 10, 8, "fixed", seed=3).proj_img.weight, w_img)
    # An image-only student (no txt_* outputs) aligns its one modality.
    image_only = {k: v for k, v in s.items() if not k.startswith("txt_")}
    torch.testing.assert_close(loss(image_only, t), ((s["img_proj"] - t["img_raw"] @ w_img.T) ** 2).mean())


def test_learned_projection_is_exposed_to_the_optimizer():
    loss = FeatureMSELoss(12, 10, 8, projection="learned")
    assert sum(p.numel() for p in loss.parameters()) == (8 * 12 + 8) + (8 * 10 + 8)
    with pytest.raises(ValueError, match="projection"):
        FeatureMSELoss(12, 10, 8, projection="lazy")


TEACHER_DIMS = {"img_dim": 12, "txt_dim": 10, "fusion_dim": 8}


def _combined(weights=None, n=20, nce_k=5, **kw):
    cfg = loss_config(weights, nce_k=nce_k, **kw)
    return CombinedLoss.from_config(cfg, LossContext(8, TEACHER_DIMS, n, joint_labels=torch.arange(n) % 4))


def test_total_is_weighted_sum_of_parts():
    loss = _combined({"ce": 0.7, "kl": 0.518, "mse": 112.4, "crd": 10.0}, temperature=3.19)
    s, t = _outputs(seed=1), _outputs(seed=2)
    y_mod, y_loc, index = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([0, 1, 2, 3, 4, 0]), torch.arange(6)
    parts = loss(s, t, torch.stack((y_mod, y_loc), 1), index)
    assert set(parts) == {"total", "ce", "kl", "mse", "crd"}
    expected = 0.7 * parts["ce"] + 0.518 * parts["kl"] + 112.4 * parts["mse"] + 10.0 * parts["crd"]
    torch.testing.assert_close(parts["total"], expected)
    ce = F.cross_entropy(s["logits_modality"], y_mod) + F.cross_entropy(s["logits_location"], y_loc)
    torch.testing.assert_close(parts["ce"], ce)
    kl = kd_kl_loss(s["logits_modality"], t["logits_modality"], 3.19) + kd_kl_loss(
        s["logits_location"], t["logits_location"], 3.19)
    torch.testing.assert_close(parts["kl"], kl)
    assert parts["crd"].item() > 0


def test_term_defaults_are_the_studys():
    cfg = loss_config()
    assert cfg.weights == {"ce": 1.0, "kl": 0.518, "mse": 112.4, "crd": 10.0}
    assert (cfg.kl.temperature, cfg.mse.projection, cfg.crd.feat_dim, cfg.crd.nce_k, cfg.crd.nce_t, cfg.crd.nce_m,
            cfg.ce.class_weights) == (3.19, "fixed", 128, 1024, 0.07, 0.5, "none")
    loss = CombinedLoss.from_config(cfg, LossContext(8, TEACHER_DIMS, 2000))
    assert loss.weights == cfg.weights and list(loss.terms) == ["ce", "kl", "mse", "crd"]
    assert loss.terms["kl"].temperature == 3.19
    crd = loss.terms["crd"]
    assert (crd.nce_k, crd.nce_t, crd.nce_m, crd.embed_s[0].out_features) == (1024, 0.07, 0.5, 128)


def test_one_registry_entry_per_term_from_params_to_parts():
    # params.yaml `loss.<name>` -> its registry entry (keys, weight, module) -> the part `name` (`train_<name>`).
    assert list(LOSS_TERMS) == ["ce", "kl", "mse", "crd"]  # build and summation order
    assert set(LossConfig.model_fields) == set(LOSS_TERMS)
    for name, term in LOSS_TERMS.items():
        module = term_module(name)
        assert issubclass(module, torch.nn.Module) and callable(module.from_config), name
        assert issubclass(term.config, TermConfig) and "weight" in term.config.model_fields, name
    assert [n for n, t in LOSS_TERMS.items() if t.reads_teacher] == ["kl", "mse", "crd"]
    with pytest.raises(ValueError, match="alpha\n  Extra inputs are not permitted"):
        LossConfig.from_dict({"ce": {"weight": 1.0}, "alpha": {"weight": 0.5}})
    with pytest.raises(ValueError, match="kl.weight\n  Field required"):
        LossConfig.from_dict({"ce": {"weight": 1.0}, "kl": {"temperature": 2.0}})
    with pytest.raises(ValueError, match="at least one term with a weight above 0"):
        LossConfig.from_dict({"ce": {"weight": 0.0}})


def test_zero_or_absent_weight_builds_no_term_and_index_required_for_crd():
    s, t = _outputs(), _outputs(seed=1)
    y = torch.zeros(6, 2, dtype=torch.long)
    loss = _combined({"ce": 1.0, "kl": 0.5, "mse": 0.0})
    parts = loss(s, t, y)
    assert set(parts) == {"ce", "kl", "total"} and list(loss.parameters()) == []
    torch.testing.assert_close(parts["total"], parts["ce"] + 0.5 * parts["kl"])
    with pytest.raises(ValueError, match="index"):
        _combined()(s, t, y)


def test_ce_only_loss_needs_no_teacher():
    cfg = loss_config({"ce": 1.0})
    assert not cfg.uses_teacher and loss_config().uses_teacher
    loss = CombinedLoss.from_config(cfg, LossContext(8, None, 20))
    s = _outputs()
    y = torch.tensor([[0, 1], [1, 2], [0, 3], [1, 4], [1, 0], [0, 0]])
    parts = loss(s, None, y)
    expected = F.cross_entropy(s["logits_modality"], y[:, 0]) + F.cross_entropy(s["logits_location"], y[:, 1])
    torch.testing.assert_close(parts["total"], expected)
    with pytest.raises(ValueError, match="no teacher dims"):
        CombinedLoss.from_config(loss_config(), LossContext(8, None, 20))


def test_teacher_gets_no_gradient(tiny_batch):
    teacher, student = tiny_model(fusion_dim=24, seed=1), tiny_model(fusion_dim=16, seed=2)
    args = (tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    t_out = teacher(*args)  # deliberately *with* autograd: the loss itself must cut the graph
    s_out = student(*args)
    loss = CombinedLoss.from_config(loss_config(nce_k=4), LossContext(
        student.fusion_dim, {"img_dim": 32, "txt_dim": 32, "fusion_dim": 24}, 8, joint_labels=torch.arange(8) % 3))
    parts = loss(s_out, t_out, tiny_batch["labels"], tiny_batch["index"])
    parts["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in loss.terms["crd"].embed_s.parameters())
    assert all(p.grad is not None for p in loss.terms["crd"].embed_t.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loss_parameters_change_after_one_optimizer_step(tiny_batch):
    student = tiny_model(fusion_dim=16)
    loss = CombinedLoss.from_config(loss_config(nce_k=4, projection="learned"), LossContext(
        student.fusion_dim, {"img_dim": 20, "txt_dim": 18, "fusion_dim": 24}, 8, joint_labels=torch.arange(8) % 3))
    names = {n for n, _ in loss.named_parameters()}
    assert {"terms.crd.embed_s.0.weight", "terms.crd.embed_t.0.weight", "terms.mse.proj_img.weight",
            "terms.mse.proj_txt.weight"} <= names
    before = {n: p.detach().clone() for n, p in loss.named_parameters()}
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-2)
    s_out = student(tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    t_out = {k: torch.randn(4, d) for k, d in [("logits_modality", 2), ("logits_location", 5),
                                               ("img_raw", 20), ("txt_raw", 18), ("fused", 24)]}
    loss(s_out, t_out, tiny_batch["labels"], tiny_batch["index"])["total"].backward()
    optimizer.step()
    for n, p in loss.named_parameters():
        assert not torch.equal(before[n], p.detach()), n


# ----------------------------------------------------------------------------------- CRD


def fused(x):
    return {"fused": x}


def test_crd_memory_updates_only_batch_rows_and_keeps_unit_norm():
    crd = CRDLoss(6, 7, n_data=12, feat_dim=5, nce_k=4, nce_t=0.07, nce_m=0.5, labels=torch.arange(12) % 3)
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    torch.testing.assert_close(mem_s.norm(dim=1), torch.ones(12))
    index = torch.tensor([1, 4, 9])
    f_s, f_t = torch.randn(3, 6), torch.randn(3, 7)
    crd(fused(f_s), fused(f_t), None, index)
    other = torch.tensor([i for i in range(12) if i not in index.tolist()])
    for new, old, head, f in ((crd.memory_s, mem_s, crd.embed_s, f_s), (crd.memory_t, mem_t, crd.embed_t, f_t)):
        torch.testing.assert_close(new[other], old[other], rtol=0, atol=0)
        assert not torch.allclose(new[index], old[index])
        torch.testing.assert_close(new.norm(dim=1), torch.ones(12))
        v = F.normalize(head(f), dim=1).detach()
        torch.testing.assert_close(new[index], F.normalize(0.5 * old[index] + 0.5 * v, dim=1))
    # Evaluation mode leaves the memory alone.
    crd.eval()
    frozen = crd.memory_s.clone()
    crd(fused(f_s), fused(f_t), None, index)
    torch.testing.assert_close(crd.memory_s, frozen, rtol=0, atol=0)


@pytest.mark.parametrize("nce_k", [3, 40])  # pool of other labels is 8: without / with replacement
def test_crd_negatives_never_share_the_anchor_joint_label(nce_k):
    labels = torch.arange(12) % 3  # each label has 4 samples; 8 are "other"
    crd = CRDLoss(4, 4, n_data=12, feat_dim=8, nce_k=nce_k, nce_t=0.07, nce_m=0.5, labels=labels)
    index = torch.arange(12)
    for _ in range(20):
        contrast = crd.sample_contrast_index(index)
        assert contrast.shape == (12, nce_k + 1)
        assert torch.equal(contrast[:, 0], index)
        assert (labels[contrast[:, 1:]] != labels[index].unsqueeze(1)).all()
    if nce_k <= 8:  # without replacement when the pool is large enough
        assert all(len(set(row.tolist())) == nce_k for row in contrast[:, 1:])


def test_crd_loss_matches_nce_formula_by_hand():
    torch.manual_seed(0)
    n, k, T = 10, 3, 0.07
    crd = CRDLoss(6, 5, n_data=n, feat_dim=4, nce_k=k, nce_t=T, nce_m=0.5)
    mem_s, mem_t = crd.memory_s.clone().numpy(), crd.memory_t.clone().numpy()
    f_s, f_t = torch.randn(2, 6), torch.randn(2, 5)
    index = torch.tensor([2, 7])
    contrast = torch.tensor([[2, 0, 1, 3], [7, 4, 5, 6]])
    loss = crd(fused(f_s), fused(f_t), None, index, contrast).item()

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    with torch.no_grad():
        v_s = unit(crd.embed_s(f_s).numpy())
        v_t = unit(crd.embed_t(f_t).numpy())
    idx = contrast.numpy()
    h_s = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], v_s) / T)  # student anchor vs teacher memory
    h_t = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], v_t) / T)
    expected = 0.0
    for h in (h_s, h_t):
        h = h / (h.mean() * n)  # Z fixed on the first batch
        m_pn = k / n
        pos = np.log(h[:, 0] / (h[:, 0] + m_pn + 1e-7))
        neg = np.log(m_pn / (h[:, 1:] + m_pn + 1e-7))
        expected += -(pos.sum() + neg.sum()) / len(h)
    assert loss == pytest.approx(expected, rel=1e-5)
    # Z stays fixed after the first batch.
    z = crd.z_norm.clone()
    crd(fused(f_s * 2), fused(f_t), None, index, contrast)
    torch.testing.assert_close(crd.z_norm, z)


def test_crd_gradients_reach_heads_and_inputs():
    crd = CRDLoss(6, 5, n_data=10, feat_dim=4, nce_k=3, nce_t=0.07, nce_m=0.5, labels=torch.arange(10) % 2)
    f_s = torch.randn(4, 6, requires_grad=True)
    f_t = torch.randn(4, 5, requires_grad=True)
    crd(fused(f_s), fused(f_t), None, torch.tensor([0, 1, 2, 3])).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None  # the teacher side is a fixed target
    for p in crd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_crd_refuses_single_label_data():
    crd = CRDLoss(4, 4, n_data=5, feat_dim=8, nce_k=2, nce_t=0.07, nce_m=0.5, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="negatives"):
        crd(fused(torch.randn(2, 4)), fused(torch.randn(2, 4)), None, torch.tensor([0, 1]))


def test_balanced_class_weighted_ce_by_hand():
    """class_weights: balanced -> mean_i(w[y_i] · CE_i) with w = n / (K · n_class) per task."""
    train_labels = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]])  # task 1: 3 of class 0, 1 of class 1
    ctx = LossContext(8, None, n_data=4, train_labels=train_labels, num_classes=(2, 3))
    loss = CombinedLoss.from_config(loss_config({"ce": 1.0}, class_weights="balanced"), ctx)
    logits1 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    logits2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([[0, 0], [1, 2], [1, 1]])
    out = {"logits_modality": logits1, "logits_location": logits2}
    w1 = {0: 4 / (2 * 3), 1: 4 / (2 * 1)}
    w2 = {0: 4 / (3 * 1), 1: 4 / (3 * 1), 2: 4 / (3 * 2)}
    expected = 0.0
    for logits, weights, task in ((logits1, w1, 0), (logits2, w2, 1)):
        nll = [-(logits[i, labels[i, task]] - torch.logsumexp(logits[i], 0)) for i in range(3)]
        expected += sum(weights[int(labels[i, task])] * nll[i] for i in range(3)) / 3
    assert loss(out, None, labels)["ce"] == pytest.approx(float(expected), rel=1e-6)
    plain = CombinedLoss.from_config(loss_config({"ce": 1.0}), ctx)(out, None, labels)["ce"]
    unweighted = sum(torch.nn.functional.cross_entropy(logits, labels[:, t]) for t, logits in enumerate((logits1, logits2)))
    assert plain == pytest.approx(float(unweighted), rel=1e-7)
    with pytest.raises(ValueError, match="needs the training labels"):
        CombinedLoss.from_config(loss_config({"ce": 1.0}, class_weights="balanced"), LossContext(8, None, 4))
    no_class_2 = LossContext(8, None, n_data=2, train_labels=torch.tensor([[0, 0], [1, 1]]), num_classes=(2, 3))
    with pytest.raises(ValueError, match=r"task 2 has no training sample of class\(es\) \[2\]"):
        CombinedLoss.from_config(loss_config({"ce": 1.0}, class_weights="balanced"), no_class_2)
