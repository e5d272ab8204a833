"""MIL models: output shapes, empty-cluster masking, Cox partial likelihood against lifelines, k-means on training patients only."""
import numpy as np
import pandas as pd
import pytest
import torch

from wsi_study.models.abmil import ABMIL, CLAMSB, MaxPoolMIL, PatchInputs
from wsi_study.models.bags import synthetic_bags
from wsi_study.models.deepattnmisl import ClusterInputs, DeepAttnMISL, kmeans_fit, masked_softmax
from wsi_study.models.losses import TaskHead, coral_loss, coral_probs, cox_ph_loss, smooth_svm_loss, task_loss


@pytest.mark.parametrize("cls", [DeepAttnMISL, ABMIL, CLAMSB, MaxPoolMIL])
def test_output_shapes(cls):
    """Every model gives one risk per patient, 4 stage logits, or 3 CORAL logits, and one attention per input."""
    x, mask = torch.randn(3, 9, 12), torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    for task, ordinal, shape in [("survival", False, (3,)), ("stage", False, (3, 4)), ("stage", True, (3, 3))]:
        net = cls(12, task=task, ordinal=ordinal).eval()
        with torch.no_grad():
            o = net(x, mask)
        assert o["out"].shape == shape
        assert o["attention"].shape == (3, 9)
        assert torch.allclose(o["attention"].sum(1), torch.ones(3), atol=1e-5)
        assert o["attention"][1, 4:].abs().sum() == 0


def test_auxiliary_head():
    """With aux_task the second head's output comes back beside the main one."""
    x, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    o = DeepAttnMISL(6, task="survival", aux_task="stage")(x, mask)
    assert o["out"].shape == (2,) and o["aux_out"].shape == (2, 4)


def test_empty_clusters_are_masked():
    """An empty cluster gets exactly zero attention, and garbage (even NaN) in its slot changes nothing."""
    torch.manual_seed(0)
    net = DeepAttnMISL(16, task="survival").eval()
    x = torch.randn(4, 8, 16)
    mask = torch.rand(4, 8) > 0.4
    mask[:, 0] = True
    with torch.no_grad():
        o = net(x, mask)
        assert o["attention"][~mask].abs().max() == 0
        for garbage in (1e6 * torch.randn_like(x), torch.full_like(x, float("nan"))):
            x2 = torch.where(mask[..., None], x, garbage)
            o2 = net(x2, mask)
            assert torch.equal(o2["out"], o["out"]) and torch.equal(o2["attention"], o["attention"])


def test_masked_softmax_all_masked_row_is_zero():
    """A row with nothing unmasked gives zeros, not NaN."""
    a = masked_softmax(torch.randn(2, 3), torch.tensor([[True, False, True], [False, False, False]]))
    assert torch.isfinite(a).all() and a[1].sum() == 0 and torch.isclose(a[0].sum(), torch.tensor(1.0))


def _tied_survival_frame():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(40)
    t = np.round(rng.exponential(np.exp(-0.8 * x)) * 4) + 1  # rounded: many tied times, tied events among them
    e = (rng.random(40) < 0.75).astype(int)
    return pd.DataFrame({"x": x, "T": t, "E": e})


def test_cox_loss_efron_matches_lifelines():
    """Our Efron loss at lifelines' fitted coefficient equals minus lifelines' log-likelihood (sum convention)."""
    from lifelines import CoxPHFitter
    df = _tied_survival_frame()
    assert df[df.E == 1]["T"].duplicated().any()  # tied event times are present
    cph = CoxPHFitter().fit(df, "T", "E")
    beta = float(cph.params_["x"])
    risk = torch.tensor(df.x.to_numpy() * beta, dtype=torch.float64)
    t, e = torch.tensor(df["T"].to_numpy()), torch.tensor(df.E.to_numpy())
    ours = cox_ph_loss(risk, t, e, ties="efron", reduction="sum")
    assert abs(float(ours) + cph.log_likelihood_) < 1e-6
    mean = cox_ph_loss(risk, t, e, ties="efron")  # the mean convention divides by the number of events
    assert abs(float(mean) * df.E.sum() + cph.log_likelihood_) < 1e-6


def test_cox_loss_strata_matches_lifelines():
    """Stratified: our Efron loss at lifelines' fitted coefficient (strata=) equals minus lifelines' log-likelihood."""
    from lifelines import CoxPHFitter
    df = _tied_survival_frame()
    df["stage"] = np.arange(len(df)) % 3
    df["x"] = df.x + df.stage  # a stratum-level shift: the stratified fit ignores it, the plain one does not
    cph = CoxPHFitter().fit(df, "T", "E", strata=["stage"])
    risk = torch.tensor(df.x.to_numpy() * float(cph.params_["x"]), dtype=torch.float64)
    t, e, s = (torch.tensor(df[c].to_numpy()) for c in ("T", "E", "stage"))
    assert abs(float(cox_ph_loss(risk, t, e, "efron", "sum", strata=s)) + cph.log_likelihood_) < 1e-6
    assert abs(float(cox_ph_loss(risk, t, e, "efron", "sum")) + cph.log_likelihood_) > 1e-3
    assert cox_ph_loss(risk, t, torch.zeros_like(e), strata=s) is None


def test_cox_loss_breslow():
    """Breslow equals lifelines when no two events share a time, and the textbook formula when they do."""
    from lifelines import CoxPHFitter
    df = _tied_survival_frame()
    dfu = df.copy()
    dfu["T"] = dfu["T"] + np.where(dfu.E == 1, np.arange(len(dfu)) * 1e-3, 0)  # untie events; event-censored ties remain
    assert (dfu[dfu.E == 1]["T"].duplicated().sum() == 0) and dfu["T"].duplicated().any()
    cph = CoxPHFitter().fit(dfu, "T", "E")
    risk = torch.tensor(dfu.x.to_numpy() * float(cph.params_["x"]), dtype=torch.float64)
    ours = cox_ph_loss(risk, torch.tensor(dfu["T"].to_numpy()), torch.tensor(dfu.E.to_numpy()), reduction="sum")
    assert abs(float(ours) + cph.log_likelihood_) < 1e-6
    r, t, e = df.x.to_numpy() * 0.7, df["T"].to_numpy(), df.E.to_numpy()
    textbook = -sum(r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in range(len(r)) if e[i])
    ours = cox_ph_loss(torch.tensor(r), torch.tensor(t), torch.tensor(e), reduction="sum")
    assert abs(float(ours) - textbook) < 1e-9
    assert abs(float(cox_ph_loss(torch.tensor(r), torch.tensor(t), torch.tensor(e), ties="efron", reduction="sum")) - textbook) > 1e-3


def test_cox_loss_batch_without_events_and_gradient():
    """No event: no loss (None). Otherwise the gradient pushes the earlier death's risk up."""
    assert cox_ph_loss(torch.randn(5), torch.arange(5.0), torch.zeros(5)) is None
    r = torch.zeros(3, requires_grad=True)
    cox_ph_loss(r, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 0])).backward()
    assert r.grad[0] < 0 < r.grad[1]


def test_stage_heads_and_losses():
    """CORAL probabilities sum to 1 and follow confident logits; missing stage labels add no loss; SVM margin."""
    y = torch.tensor([0, 1, 2, 3])
    sure = torch.where(y[:, None] > torch.arange(3), 8.0, -8.0)
    assert coral_loss(sure, y) < 1e-2
    assert torch.equal(coral_probs(sure).argmax(1), y)
    assert torch.allclose(coral_probs(torch.randn(6, 3)).sum(1), torch.ones(6))
    assert task_loss(torch.randn(2, 4), {"stage": torch.tensor([-1, -1])}, "stage") is None
    assert TaskHead(5, "stage", ordinal=True)(torch.randn(2, 5)).shape == (2, 3)
    assert smooth_svm_loss(torch.tensor([[4.0, 0.0]]), torch.tensor([0]), tau=0.01) < 1e-3


def test_clam_instance_loss_trains_instance_classifiers():
    """CLAM-SB's instance loss reaches the classifier of the bag's stage and needs bags of two patches or more."""
    net = CLAMSB(6, hidden=8, attn_hidden=4, task="stage", k_sample=2)
    x, mask = torch.randn(2, 6, 6), torch.ones(2, 6, dtype=torch.bool)
    o = net(x, mask, stage=torch.tensor([1, 3]))
    o["inst_loss"].backward()
    assert net.instance[1].weight.grad.abs().sum() > 0 and net.instance[3].weight.grad.abs().sum() > 0
    single = torch.zeros(2, 6, dtype=torch.bool)
    single[:, 0] = True
    assert float(CLAMSB(6, hidden=8, attn_hidden=4, k_sample=2)(x, single)["inst_loss"].detach()) == 0


def test_kmeans_is_fitted_on_training_patients_only():
    """Changing the test patients' patches does not move the centroids; they are assigned with them."""
    bags = synthetic_bags(16, dim=6, seed=2)
    train = np.arange(10)
    a = ClusterInputs(bags, train, k=4, seed=0)
    bags.features[bags.offsets[12]:bags.offsets[16]] += 100.0  # far away: would grab a centroid if used
    b = ClusterInputs(bags, train, k=4, seed=0)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.assign[:bags.offsets[10]], b.assign[:bags.offsets[10]])
    assert b.counts.sum() == bags.offsets[-1]


def test_kmeans_repeatable_and_finds_clusters():
    """Same seed, same centroids; three separated blobs are recovered."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    pts = centres.repeat_interleave(40, 0) + 0.3 * torch.randn(120, 2, generator=g)
    c = kmeans_fit(pts, 3, seed=5)
    assert torch.equal(c, kmeans_fit(pts, 3, seed=5))
    assert (torch.cdist(centres, c).min(1).values < 0.3).all()


def test_patch_inputs_padding_and_attention_order():
    """Padded batches hold each bag's patches in order; attention maps back per patient."""
    bags = synthetic_bags(5, dim=4)
    pi = PatchInputs(bags)
    b = pi.batch([4, 0])
    assert torch.equal(b["x"][0, :bags.sizes[4]], bags.bag(4)) and b["mask"].sum() == bags.sizes[[4, 0]].sum()
    att = torch.rand(2, b["x"].shape[1])
    per = pi.patch_attention(att, [4, 0])
    assert [len(p) for p in per] == bags.sizes[[4, 0]].tolist()
