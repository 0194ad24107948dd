"""Cox loss, concordance index, its Ignite metric and the survival network (volpre.survival).

References are independent of the code under test: loop-based partial likelihoods written here
from the formulas, ``lifelines`` (CoxPHFitter with Efron ties, ``utils.concordance_index``) and
``scipy.optimize``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index as lifelines_concordance_index
from monai.data import DataLoader
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator, SupervisedTrainer
from monai.handlers import from_engine
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNetFeatures
from scipy.optimize import minimize
from scipy.special import logsumexp
from torch import nn

from volpre.survival import ConcordanceIndex, CoxPHLoss, SurvivalNet, concordance_index, cox_ph_loss

# ----------------------------------------------------------------------------- references and data


def breslow_reference(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Negative Breslow partial log-likelihood / number of events, one event at a time."""
    total, num_events = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            at_risk = time >= time[i]
            total += risk[i] - logsumexp(risk[at_risk])
            num_events += 1
    return -total / max(num_events, 1)


def efron_reference(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Negative Efron partial log-likelihood / number of events, one event time at a time."""
    total = 0.0
    for t in np.unique(time[event]):
        died = (time == t) & event
        at_risk = time >= t
        shift = risk[at_risk].max()  # scale both sums by exp(-shift) so large risks do not overflow
        sum_at_risk = np.exp(risk[at_risk] - shift).sum()
        sum_died = np.exp(risk[died] - shift).sum()
        d = int(died.sum())
        total += risk[died].sum()
        for l in range(d):
            total -= shift + np.log(sum_at_risk - l / d * sum_died)
    return -total / max(int(event.sum()), 1)


def tied_survival_data(n: int, seed: int, num_times: int = 6, event_rate: float = 0.6):
    """Risks N(0, 1), integer times in 1..num_times (many ties), Bernoulli events."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = rng.integers(1, num_times + 1, size=n).astype(np.float64)
    event = rng.random(n) < event_rate
    return risk, time, event


def cox_dataset(n: int, seed: int):
    """Covariates X (n, 3), integer times with ties from a Cox model, about 25 % censored."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    beta = np.array([0.8, -0.5, 0.3])
    event_time = rng.exponential(1.0 / np.exp(x @ beta))
    censor_time = rng.exponential(3.0, size=n)
    time = np.ceil(np.minimum(event_time, censor_time) * 4.0)
    event = event_time <= censor_time
    return x, time, event


def fit_linear_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> np.ndarray:
    """beta minimising cox_ph_loss(X @ beta) with LBFGS in float64."""
    x_t, time_t, event_t = torch.from_numpy(x), torch.from_numpy(time), torch.from_numpy(event)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [beta], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = cox_ph_loss(x_t @ beta, time_t, event_t, ties=ties)
        loss.backward()
        return loss

    optimizer.step(closure)
    return beta.detach().numpy()


# ----------------------------------------------------------------------------- Cox loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_breslow_equals_loop_reference(seed, dtype):
    risk, time, event = tied_survival_data(40, seed)
    loss = cox_ph_loss(torch.tensor(risk, dtype=dtype), torch.from_numpy(time), torch.from_numpy(event))
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(breslow_reference(risk, time, event), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efron_equals_loop_reference(seed):
    risk, time, event = tied_survival_data(40, seed)
    risk_t = torch.tensor(risk, dtype=torch.float32)
    loss = cox_ph_loss(risk_t, torch.from_numpy(time), torch.from_numpy(event.astype(np.float32)), ties="efron")
    expected = efron_reference(risk, time, event)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(breslow_reference(risk, time, event), rel=1e-3)  # the data has tied events


def test_efron_equals_breslow_without_tied_events():
    rng = np.random.default_rng(3)
    risk = rng.normal(size=30)
    time = np.repeat(np.arange(15.0), 2)
    event = np.tile([True, False], 15)  # ties in time, but never two events at one time
    args = torch.from_numpy(risk), torch.from_numpy(time), torch.from_numpy(event)
    assert cox_ph_loss(*args, ties="efron").item() == pytest.approx(cox_ph_loss(*args).item(), rel=1e-12)


def test_efron_fit_matches_lifelines_coxphfitter():
    x, time, event = cox_dataset(80, seed=0)
    assert len(np.unique(time[event])) < event.sum() - 10  # many tied event times
    frame = pd.DataFrame(x, columns=["x0", "x1", "x2"]).assign(T=time, E=event.astype(int))
    fitter = CoxPHFitter(penalizer=0.0).fit(frame, duration_col="T", event_col="E")
    lifelines_beta = fitter.params_[["x0", "x1", "x2"]].to_numpy()

    beta = fit_linear_cox(x, time, event, ties="efron")
    np.testing.assert_allclose(beta, lifelines_beta, atol=1e-4)
    # and the likelihood itself: lifelines reports the (summed) Efron partial log-likelihood
    loss_at_lifelines_beta = cox_ph_loss(
        torch.from_numpy(x @ lifelines_beta), torch.from_numpy(time), torch.from_numpy(event), ties="efron"
    )
    assert -loss_at_lifelines_beta.item() * event.sum() == pytest.approx(fitter.log_likelihood_, rel=1e-8)


def test_breslow_fit_matches_scipy_minimum_of_loop_reference():
    x, time, event = cox_dataset(60, seed=1)
    result = minimize(
        lambda b: breslow_reference(x @ b, time, event), np.zeros(3), method="BFGS", options={"gtol": 1e-10}
    )
    beta = fit_linear_cox(x, time, event, ties="breslow")
    np.testing.assert_allclose(beta, result.x, atol=1e-4)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_gradients_are_finite_and_match_finite_differences(ties):
    risk, time, event = tied_survival_data(12, seed=4, num_times=4)
    risk_t = torch.tensor(risk, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r: cox_ph_loss(r, torch.from_numpy(time), torch.from_numpy(event), ties=ties), (risk_t,)
    )
    loss = cox_ph_loss(risk_t.float(), torch.from_numpy(time), torch.from_numpy(event), ties=ties)
    (grad,) = torch.autograd.grad(loss, risk_t)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_batch_without_events_gives_zero_with_zero_grad(ties):
    risk = torch.randn(8, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(8.0), torch.zeros(8), ties=ties)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(risk.grad, torch.zeros(8))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("event", [0.0, 1.0])
def test_single_subject_gives_zero_and_finite_grad(ties, event):
    risk = torch.tensor([3.0], requires_grad=True)
    loss = cox_ph_loss(risk, torch.tensor([5.0]), torch.tensor([event]), ties=ties)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(risk.grad).all()


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_large_risks_are_stable(ties):
    risk, time, event = tied_survival_data(40, seed=5)
    huge = risk * 500.0  # exp() overflows float64 beyond ~709
    reference = breslow_reference if ties == "breslow" else efron_reference
    huge_t = torch.tensor(huge, requires_grad=True)
    loss = cox_ph_loss(huge_t, torch.from_numpy(time), torch.from_numpy(event), ties=ties)
    loss.backward()
    assert loss.item() == pytest.approx(reference(huge, time, event), rel=1e-8)
    assert torch.isfinite(huge_t.grad).all()
    # float32: shifting every risk by 200 (exp(200) overflows float32) leaves the loss unchanged
    base = torch.tensor(risk, dtype=torch.float32)
    args = torch.from_numpy(time), torch.from_numpy(event)
    shifted = cox_ph_loss(base + 200.0, *args, ties=ties)
    assert torch.isfinite(shifted)
    assert shifted.item() == pytest.approx(cox_ph_loss(base, *args, ties=ties).item(), abs=1e-4)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_loss_under_bf16_autocast_is_float32(ties):
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    features = torch.randn(16, 4)
    _, time, event = tied_survival_data(16, seed=6)
    time_t, event_t = torch.from_numpy(time), torch.from_numpy(event)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        risk = layer(features)
        loss = cox_ph_loss(risk, time_t, event_t, ties=ties)
    assert risk.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = cox_ph_loss(risk.detach().float(), time_t, event_t, ties=ties)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_module_takes_pred_and_time_event_label():
    risk, time, event = tied_survival_data(20, seed=7)
    label = torch.from_numpy(np.stack([time, event], axis=1)).float()
    pred = torch.tensor(risk, dtype=torch.float32)[:, None]  # (B, 1), as SurvivalNet returns
    for ties, reference in (("breslow", breslow_reference), ("efron", efron_reference)):
        assert CoxPHLoss(ties=ties)(pred, label).item() == pytest.approx(reference(risk, time, event), rel=1e-5)


def test_loss_errors_name_what_was_found():
    risk, time, event = torch.randn(4), torch.arange(4.0), torch.ones(4)
    with pytest.raises(ValueError, match=r"cox_ph_loss: ties must be one of 'breslow', 'efron', got 'exact'"):
        cox_ph_loss(risk, time, event, ties="exact")
    with pytest.raises(ValueError, match=r"CoxPHLoss: ties must be one of .* got 'Efron'"):
        CoxPHLoss(ties="Efron")
    with pytest.raises(ValueError, match=r"risk must have shape \(B,\) or \(B, 1\).*got \(4, 2\)"):
        cox_ph_loss(torch.randn(4, 2), time, event)
    with pytest.raises(ValueError, match=r"time and event must have shape \(4,\) like risk, got time \(3,\)"):
        cox_ph_loss(risk, torch.arange(3.0), event)
    with pytest.raises(ValueError, match=r"CoxPHLoss: label must have shape \(B, 2\) .*\[time, event\].*got \(4,\)"):
        CoxPHLoss()(risk, time)


# ----------------------------------------------------------------------------- concordance index


@pytest.mark.parametrize(
    "n, num_times, risk_levels, event_rate, seed",
    [
        (50, 8, 5, 0.6, 0),  # ties in time and in risk, censoring
        (50, 3, 3, 0.5, 1),  # heavy ties
        (200, 1000, None, 0.3, 2),  # continuous risks, heavy censoring
        (3000, 50, 20, 0.7, 3),  # several row blocks
        (2, 2, None, 1.0, 4),
    ],
)
def test_concordance_equals_lifelines(n, num_times, risk_levels, event_rate, seed):
    rng = np.random.default_rng(seed)
    risk = rng.integers(0, risk_levels, size=n).astype(float) if risk_levels else rng.normal(size=n)
    time = rng.integers(1, num_times + 1, size=n).astype(float)
    event = rng.random(n) < event_rate
    event[0] = True
    time[1] = time[0] + 1  # at least one comparable pair
    expected = lifelines_concordance_index(time, -risk, event)
    assert concordance_index(risk, time, event) == pytest.approx(expected, abs=1e-6)
    # tensors, a (n, 1) risk, a bool event tensor and a bf16 risk give the same
    risk_t = torch.tensor(risk, dtype=torch.float32)[:, None]
    assert concordance_index(risk_t, torch.tensor(time), torch.tensor(event)) == pytest.approx(expected, abs=1e-6)
    if risk_levels:  # small integers are exact in bf16
        bf16 = torch.tensor(risk, dtype=torch.bfloat16)
        assert concordance_index(bf16, time, event.astype(float)) == pytest.approx(expected, abs=1e-6)


def test_concordance_of_small_hand_cases():
    # higher risk died first: concordant
    assert concordance_index([2.0, 1.0], [1.0, 2.0], [1, 1]) == 1.0
    assert concordance_index([1.0, 2.0], [1.0, 2.0], [1, 0]) == 0.0
    # same time, only the first had the event: comparable, the event should have the higher risk
    assert concordance_index([2.0, 1.0], [3.0, 3.0], [1, 0]) == 1.0
    assert concordance_index([1.0, 1.0], [3.0, 3.0], [1, 0]) == 0.5
    assert lifelines_concordance_index([3.0, 3.0], [-1.0, -1.0], [1, 0]) == 0.5


@pytest.mark.parametrize(
    "risk, time, event",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0, 0]),  # no events
        ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [1, 1, 1]),  # all events at one time
        ([1.0, 2.0], [5.0, 1.0], [1, 0]),  # the only event is after the censoring
        ([1.0], [1.0], [1]),
    ],
)
def test_no_comparable_pair_raises_like_lifelines(risk, time, event):
    with pytest.raises(ZeroDivisionError):
        lifelines_concordance_index(time, -np.asarray(risk), event)
    message = rf"no comparable pair among {len(time)} subjects with {sum(event)} events"
    with pytest.raises(ZeroDivisionError, match=message):
        concordance_index(risk, time, event)


def test_concordance_errors_name_what_was_found():
    with pytest.raises(ValueError, match=r"one value per subject, got 3, 2 and 3 values"):
        concordance_index([1.0, 2.0, 3.0], [1.0, 2.0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"event must be 0 \(censored\) or 1 \(event observed\), found \[0.5, 2.0\]"):
        concordance_index([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.5, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"risk holds 1 NaN or infinite values"):
        concordance_index([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"time must have shape \(n,\) or \(n, 1\), got \(3, 2\)"):
        concordance_index([1.0, 2.0, 3.0], np.ones((3, 2)), [1, 1, 1])


# ----------------------------------------------------------------------------- Ignite metric


def metric_data(seed: int = 8, n: int = 40):
    """risk (n, 1) float32 and label (n, 2) [time, event] float32 with ties and censoring."""
    risk, time, event = tied_survival_data(n, seed, num_times=10)
    label = torch.from_numpy(np.stack([time, event], axis=1)).float()
    return torch.tensor(risk, dtype=torch.float32)[:, None], label


def test_metric_in_one_process_equals_function_on_all_data():
    risk, label = metric_data()
    expected = lifelines_concordance_index(label[:, 0].numpy(), -risk[:, 0].numpy(), label[:, 1].numpy())
    metric = ConcordanceIndex()
    metric.update((risk[:15], label[:15]))  # batch tensors
    metric.update((list(risk[15:30]), list(label[15:30])))  # decollated per-subject tensors
    metric.update((risk[30:, 0], label[30:]))  # (B,) risk
    assert metric.compute() == pytest.approx(expected, abs=1e-6)
    metric.reset()
    with pytest.raises(NotComputableError, match="at least one example"):
        metric.compute()

    # attached to an engine under a bundle-style name
    engine = Engine(lambda _engine, batch: batch)
    ConcordanceIndex().attach(engine, "val_cindex")
    state = engine.run([(risk[:20], label[:20]), (risk[20:], label[20:])])
    assert state.metrics["val_cindex"] == pytest.approx(expected, abs=1e-6)


def test_metric_update_errors_name_what_was_found():
    risk, label = metric_data(n=6)
    metric = ConcordanceIndex()
    with pytest.raises(ValueError, match=r"ConcordanceIndex.update: label must have shape \(B, 2\).*got \(6, 3\)"):
        metric.update((risk, torch.ones(6, 3)))
    with pytest.raises(ValueError, match=r"got 6 risks but 5 labels"):
        metric.update((risk, label[:5]))
    with pytest.raises(TypeError, match=r"risk must be a tensor or a non-empty list of per-subject tensors, got dict"):
        metric.update(({"pred": risk}, label))


def _gather_worker(local_rank: int, risk: torch.Tensor, label: torch.Tensor, out_dir: str) -> None:
    """One of two gloo processes: rank 0 holds subjects 0..22, rank 1 subjects 23..39."""
    rank = idist.get_rank()
    mine = slice(0, 23) if rank == 0 else slice(23, None)
    risk, label = risk[mine], label[mine]
    metric = ConcordanceIndex()
    metric.update((risk[:10], label[:10]))
    metric.update((list(risk[10:]), list(label[10:])))
    value = metric.compute()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"cindex": value, "world": idist.get_world_size()}))


def test_metric_gathers_over_two_processes(tmp_path):
    risk, label = metric_data()
    expected = concordance_index(risk, label[:, 0], label[:, 1])
    rendezvous = f"file://{tmp_path / 'rendezvous'}"  # no TCP port to collide with other runs
    with idist.Parallel(backend="gloo", nproc_per_node=2, init_method=rendezvous) as parallel:
        parallel.run(_gather_worker, risk, label, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]
    assert [r["cindex"] for r in results] == [pytest.approx(expected, abs=1e-12)] * 2
    # each half alone gives another value, so the gather is what made them equal
    assert concordance_index(risk[:23], label[:23, 0], label[:23, 1]) != pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- survival network


class TinyEncoder(nn.Module):
    """(B, 1, 16, 16, 16) -> [(B, 4, 8, 8, 8), (B, 8, 4, 4, 4)] with plain conv + ReLU stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                Convolution(3, 1, 4, strides=2, kernel_size=3, act="relu", norm=None),
                Convolution(3, 4, 8, strides=2, kernel_size=3, act="relu", norm=None),
            ]
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            image = stage(image)
            features.append(image)
        return features


def resnet10() -> nn.Module:
    return ResNetFeatures("resnet10", pretrained=False, spatial_dims=3, in_channels=1)


def test_survival_net_on_resnet_features_shapes_and_keys():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 32, 32, 32)
    net = SurvivalNet(resnet10(), encoder_channels=512).eval()
    assert net(image).shape == (2, 1)
    with_covariates = SurvivalNet(resnet10(), encoder_channels=512, num_covariates=3, hidden_channels=(16,)).eval()
    covariates = torch.randn(2, 3)
    risk = with_covariates(image, covariates)
    assert risk.shape == (2, 1) and risk.dtype == torch.float32
    assert not torch.allclose(risk, with_covariates(image, covariates + 1.0))  # the covariates reach the head
    # a pretrained ResNetFeatures state dict loads strictly into .encoder; keys read encoder.* / head.*
    pretrained = resnet10().state_dict()
    net.encoder.load_state_dict(pretrained, strict=True)
    encoder_keys = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert encoder_keys == {f"encoder.{k}" for k in pretrained}
    assert all(k.startswith(("encoder.", "head.")) for k in net.state_dict())


def test_survival_net_errors_name_what_was_found():
    image = torch.randn(2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"map has shape \(2, 8, 4, 4, 4\), expected \(B, encoder_channels=16"):
        SurvivalNet(TinyEncoder(), encoder_channels=16)(image)
    with pytest.raises(ValueError, match=r"covariates must have shape \(B=2, num_covariates=3\), got none"):
        SurvivalNet(TinyEncoder(), encoder_channels=8, num_covariates=3)(image)
    with pytest.raises(ValueError, match=r"covariates must have shape \(B=2, num_covariates=3\), got shape \(2, 4\)"):
        SurvivalNet(TinyEncoder(), encoder_channels=8, num_covariates=3)(image, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"covariates of shape \(2, 3\) but the network was built with num_covariates=0"):
        SurvivalNet(TinyEncoder(), encoder_channels=8)(image, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"encoder must return a list or tuple of feature maps.*got Tensor"):
        SurvivalNet(nn.Conv3d(1, 8, 3), encoder_channels=8)(image)
    with pytest.raises(ValueError, match=r"encoder_channels must be >= 1, got 0"):
        SurvivalNet(TinyEncoder(), encoder_channels=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        SurvivalNet(TinyEncoder(), encoder_channels=8, dropout=1.5)


def synthetic_cohort(n: int, seed: int):
    """Volumes (n, 1, 16, 16, 16) whose central cube brightness s ~ U(0, 1) sets log-hazard 8 s.

    Returns images, label (n, 2) [time, event] float32 with about a third censored, and s.
    """
    generator = torch.Generator().manual_seed(seed)
    signal = torch.rand(n, generator=generator)
    images = 0.1 * torch.randn(n, 1, 16, 16, 16, generator=generator)
    images[:, :, 5:11, 5:11, 5:11] += signal[:, None, None, None, None]
    event_time = torch.empty(n).exponential_(generator=generator) / torch.exp(8.0 * signal)
    censor_time = 3.0 * torch.empty(n).exponential_(generator=generator) * math.exp(-4.0)  # exp(-8 * mean s)
    label = torch.stack([torch.minimum(event_time, censor_time), (event_time <= censor_time).float()], dim=1)
    return images, label, signal


def test_training_survival_net_raises_concordance():
    torch.manual_seed(0)
    train_images, train_label, _ = synthetic_cohort(48, seed=1)
    test_images, test_label, test_signal = synthetic_cohort(48, seed=2)
    oracle = concordance_index(test_signal, test_label[:, 0], test_label[:, 1])
    net = SurvivalNet(TinyEncoder(), encoder_channels=8, hidden_channels=(16,))
    nn.init.zeros_(net.head.output.weight)  # every risk equal before training: C = 0.5 exactly

    def test_cindex() -> float:
        with torch.no_grad():
            return concordance_index(net.eval()(test_images), test_label[:, 0], test_label[:, 1])

    before = test_cindex()
    loss_fn = CoxPHLoss(ties="efron")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        net.train()
        optimizer.zero_grad()
        loss = loss_fn(net(train_images), train_label)
        loss.backward()
        optimizer.step()
    after = test_cindex()
    assert before == 0.5
    assert after > 0.75 and after > oracle - 0.05, (before, after, oracle)


def test_monai_trainer_and_evaluator_with_loss_metric_and_covariates():
    torch.manual_seed(0)
    images, label, _ = synthetic_cohort(24, seed=3)
    covariates = torch.randn(24, 2)
    items = [{"image": images[i], "label": label[i], "covariates": covariates[i]} for i in range(24)]
    net = SurvivalNet(TinyEncoder(), encoder_channels=8, num_covariates=2, hidden_channels=(16,))
    prepare_batch = PrepareBatchExtraInput({"covariates": "covariates"})
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=DataLoader(items, batch_size=8, shuffle=True),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=CoxPHLoss(ties="efron"),
        prepare_batch=prepare_batch,
    )
    trainer.run()
    assert np.isfinite(float(trainer.state.output[0]["loss"]))

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=5, shuffle=False),
        network=net,
        prepare_batch=prepare_batch,
        key_val_metric={"val_cindex": ConcordanceIndex(output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    with torch.no_grad():
        risk = net.eval()(images, covariates)
    expected = concordance_index(risk, label[:, 0], label[:, 1])
    assert evaluator.state.metrics["val_cindex"] == pytest.approx(expected, abs=1e-6)
    assert evaluator.state.best_metric == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- bootstrap interval of the C-index


def clustered_cohort(n_subjects: int, seed: int):
    """Subjects with one or two scans (same outcome, slightly different risk), risk tied to the outcome."""
    rng = np.random.default_rng(seed)
    hazard = rng.normal(size=n_subjects)
    time = np.ceil(rng.exponential(np.exp(-hazard)) * 100.0)
    event = (rng.uniform(size=n_subjects) < 0.7).astype(float)
    scans = rng.integers(1, 3, size=n_subjects)
    rows = np.repeat(np.arange(n_subjects), scans)
    risk = hazard[rows] + rng.normal(0.0, 0.5, size=rows.size)
    return risk, time[rows], event[rows], [f"p{k:02d}" for k in rows]


def test_bootstrap_interval_matches_scipy_bootstrap_of_lifelines_concordance():
    from scipy.stats import bootstrap

    from volpre.survival.interval import bootstrap_concordance

    risk, time, event, subjects = clustered_cohort(40, seed=0)
    result = bootstrap_concordance(risk, time, event, subjects, n_resamples=3000, seed=1)
    assert result.cindex == pytest.approx(lifelines_concordance_index(time, -risk, event))
    assert result.n_subjects == 40 and result.n_entries == len(risk) and result.level == 0.95

    # reference: scipy's percentile bootstrap over subject indices, lifelines' C of every scan of the drawn subjects
    names = sorted(set(subjects))
    rows_of = [np.flatnonzero(np.asarray(subjects) == name) for name in names]

    def c_of(drawn):
        rows = np.concatenate([rows_of[int(k)] for k in drawn])
        return lifelines_concordance_index(time[rows], -risk[rows], event[rows])

    reference = bootstrap((np.arange(len(names)),), c_of, vectorized=False, n_resamples=3000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    # two Monte Carlo estimates of the same quantiles: equal up to resampling noise
    assert result.low == pytest.approx(reference.low, abs=0.02)
    assert result.high == pytest.approx(reference.high, abs=0.02)
    assert result.low < result.cindex < result.high and result.high - result.low > 0.05
    # reproducible per seed
    assert bootstrap_concordance(risk, time, event, subjects, n_resamples=3000, seed=1) == result


def test_bootstrap_interval_errors_name_what_was_found():
    from volpre.survival.interval import bootstrap_concordance

    risk, time, event, subjects = clustered_cohort(10, seed=3)
    with pytest.raises(ValueError, match=r"got 9 subject ids for \d+ scans"):
        bootstrap_concordance(risk, time, event, subjects[:9])
    with pytest.raises(ValueError, match=r"n_resamples must be an integer >= 100, got 10"):
        bootstrap_concordance(risk, time, event, subjects, n_resamples=10)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 95"):
        bootstrap_concordance(risk, time, event, subjects, level=95)
    # one comparable pair among five subjects (the event at 1.0 and the subject censored at 2.0; three are
    # censored before 1.0): a draw holds both with probability 0.42, so most draws have no comparable pair
    with pytest.raises(ValueError, match=r"draws of 5 subjects had no comparable pair; too few events"):
        bootstrap_concordance([0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0, 0.0],
                              n_resamples=100)
