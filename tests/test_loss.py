"""The contrastive and SigLIP losses and their gathers: single-process properties, then the
distributed maths.

    PYTHONPATH=src:. .venv/bin/python -m pytest tests/test_loss.py -q

The multi-process tests run W = 2 and 3 gloo ranks on CPU, each holding a slice of one seeded
global batch, and compare with a single process holding the whole batch (the claims are listed
in src/clipforge/loss/contrastive.py): mean loss over ranks == global loss; each rank's feature
gradient / W == the global gradient of its slice; mean scale gradient == global scale gradient;
and, through a tiny model, rank-averaged parameter gradients == global parameter gradients.
SigLipLoss runs the same checks at W = 2, 3 and 4 for both of its forms (ring and gather), plus
its metrics, ring == gather, equality with open_clip's SigLipLoss, and the ring's saved memory.
"""

from __future__ import annotations

import functools
import math
from importlib import metadata, util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import Tensor, nn

from clipforge.loss import ContrastiveLoss, all_gather_with_grad, world_info
from clipforge.loss.siglip import DIST_IMPLS, SigLipLoss

LOCAL_BATCH = 4
DIM = 8
IN_DIM = 6
SCALE = 1 / 0.07  # CLIP's initial logit scale
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initial scale and bias
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- helpers


def reference_loss(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """The textbook global loss: the full N x N matrix in one process."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_siglip(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """The textbook global sigmoid loss: every pair of the N x N matrix, normalized by N."""
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def siglip_leaves(dtype: torch.dtype) -> list[Tensor]:
    return [leaf(torch.tensor([v], dtype=dtype)) for v in (SIGLIP_SCALE, SIGLIP_BIAS)]


def paired_features(n: int, dtype: torch.dtype, seed: int = 4) -> tuple[Tensor, Tensor]:
    """Seeded pairs whose texts lean towards their images, so the accuracies lie inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


def reference_siglip_metrics(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor):
    """SigLipLoss's metrics written out on the full N x N matrix in one process."""
    with torch.no_grad():
        logits = scale * image @ text.T + bias
        n = logits.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        positive, negative = logits.diagonal(), logits[off_diagonal]
        best_negative = logits.masked_fill(~off_diagonal, float("-inf"))
        return {
            "loss_pos": -F.logsigmoid(positive).sum() / n,
            "loss_neg": -F.logsigmoid(-negative).sum() / n,
            "acc_i2t": (positive > best_negative.amax(dim=1)).float().mean(),
            "acc_t2i": (positive > best_negative.amax(dim=0)).float().mean(),
            "positive_logit": positive.mean(),
            "negative_logit": negative.mean(),
            "logit_scale": scale.reshape(()),
            "logit_bias": bias.reshape(()),
        }


@functools.cache
def open_clip_loss() -> ModuleType:
    """open_clip 3.3.0's loss.py, loaded on its own.

    Importing the package runs its __init__ (timm, the hub clients: ~10 s per process on the
    test machines, and every distributed rank would pay it); loss.py itself needs only torch.
    """
    spec = util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed (pip install open-clip-torch==3.3.0)")
    assert metadata.version("open-clip-torch") == "3.3.0", metadata.version("open-clip-torch")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    loader_spec = util.spec_from_file_location("open_clip_3_3_0_loss", path)
    module = util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def run_siglip(loss_fn, image: Tensor, text: Tensor, weight: float = 1.0) -> dict[str, object]:
    """Call a SigLIP loss on fresh leaves, backpropagate weight * loss; loss, grads, metrics."""
    leaves = [leaf(image), leaf(text), *siglip_leaves(image.dtype)]
    if hasattr(loss_fn, "loss_and_metrics"):
        loss, metrics = loss_fn.loss_and_metrics(*leaves)
    else:  # open_clip's returns the loss only
        loss, metrics = loss_fn(*leaves), {}
    (loss * weight).backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in leaves], "metrics": metrics}


def saved_for_backward(fn) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every tensor autograd saves while fn() runs."""
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def global_features(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded normalized features; every rank and the parent build the same tensors."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


def leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


class TinyClip(nn.Module):
    """Two linear towers and a learned log-scale: the smallest model with CLIP's outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.image_proj = nn.Linear(IN_DIM, DIM)
        self.text_proj = nn.Linear(IN_DIM, DIM)
        self.log_scale = nn.Parameter(torch.tensor(math.log(SCALE)))

    def forward(self, images: Tensor, texts: Tensor) -> dict[str, Tensor]:
        return {
            "image_features": F.normalize(self.image_proj(images), dim=1),
            "text_features": F.normalize(self.text_proj(texts), dim=1),
            "logit_scale": self.log_scale.exp(),
        }


def model_inputs(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, IN_DIM, generator=g), torch.randn(n, IN_DIM, generator=g)


# ----------------------------------------------------------------------------- single process


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert all_gather_with_grad(x) is x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_full_matrix_reference(dtype: torch.dtype) -> None:
    image, text = global_features(12, dtype)
    ours = [leaf(image), leaf(text), leaf(torch.tensor([SCALE], dtype=dtype))]
    ref = [leaf(image), leaf(text), leaf(torch.tensor([SCALE], dtype=dtype))]
    loss = ContrastiveLoss()(*ours)
    expected = reference_loss(*ref)
    loss.backward()
    expected.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss, expected, atol=tol, rtol=0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0)


def test_symmetric_in_image_and_text() -> None:
    image, text = global_features(10, torch.float64)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    loss = ContrastiveLoss()
    torch.testing.assert_close(loss(image, text, scale), loss(text, image, scale))


def test_scale_shape_one_or_scalar() -> None:
    image, text = global_features(10, torch.float64)
    loss = ContrastiveLoss()
    a = loss(image, text, torch.tensor(SCALE, dtype=torch.float64))
    b = loss(image, text, torch.tensor([SCALE], dtype=torch.float64))
    assert a.shape == b.shape == ()
    torch.testing.assert_close(a, b)


def test_random_features_give_log_n() -> None:
    # With scale 1 and random unit vectors in many dimensions every logit is ~0, so each row is
    # a near-uniform softmax over N candidates.
    n = 32
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(n, 512, generator=g), dim=1)
    text = F.normalize(torch.randn(n, 512, generator=g), dim=1)
    loss = ContrastiveLoss()(image, text, torch.tensor(1.0))
    assert abs(loss.item() - math.log(n)) < 0.05


def test_loss_decreases_as_pairs_align() -> None:
    image, noise = global_features(16, torch.float64)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    losses = [
        ContrastiveLoss()(image, F.normalize(image + w * noise, dim=1), scale).item()
        for w in (4.0, 1.0, 0.25, 0.0)
    ]
    assert losses == sorted(losses, reverse=True), losses
    assert losses[-1] < 0.05 * math.log(16)


def test_metrics_report_the_same_loss_and_accuracy() -> None:
    image, _ = global_features(8, torch.float64)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    module = ContrastiveLoss()
    loss, metrics = module.loss_and_metrics(image, image, scale)
    torch.testing.assert_close(loss, module(image, image, scale))
    torch.testing.assert_close(loss, (metrics["loss_i2t"] + metrics["loss_t2i"]) / 2)
    assert metrics["acc_i2t"].item() == metrics["acc_t2i"].item() == 1.0
    assert not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("impl", DIST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_siglip_matches_full_matrix_reference(dtype: torch.dtype, impl: str) -> None:
    image, text = global_features(12, dtype)
    ours = [leaf(image), leaf(text), *siglip_leaves(dtype)]
    ref = [leaf(image), leaf(text), *siglip_leaves(dtype)]
    loss = SigLipLoss(dist_impl=impl)(*ours)
    expected = reference_siglip(*ref)
    loss.backward()
    expected.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss, expected, atol=tol, rtol=0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0)


@pytest.mark.parametrize("impl", DIST_IMPLS)
def test_siglip_symmetric_and_decreases_as_pairs_align(impl: str) -> None:
    image, noise = global_features(16, torch.float64)
    scale, bias = (torch.tensor(v, dtype=torch.float64) for v in (SIGLIP_SCALE, SIGLIP_BIAS))
    loss = SigLipLoss(dist_impl=impl)
    text = F.normalize(image + noise, dim=1)
    torch.testing.assert_close(loss(image, text, scale, bias), loss(text, image, scale, bias))
    losses = [
        loss(image, F.normalize(image + w * noise, dim=1), scale, bias).item()
        for w in (4.0, 1.0, 0.25, 0.0)
    ]
    assert losses == sorted(losses, reverse=True), losses


@pytest.mark.parametrize("impl", DIST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_siglip_matches_open_clip(dtype: torch.dtype, impl: str) -> None:
    image, text = paired_features(12, dtype)
    ours = run_siglip(SigLipLoss(dist_impl=impl), image, text)
    theirs = run_siglip(open_clip_loss().SigLipLoss(), image, text)
    tol = TOL[dtype]
    torch.testing.assert_close(ours["loss"], theirs["loss"], atol=tol, rtol=0)
    for a, b in zip(ours["grads"], theirs["grads"], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("impl", DIST_IMPLS)
def test_siglip_metrics_match_full_matrix(impl: str) -> None:
    image, text = paired_features(12, torch.float64)
    scale, bias = (torch.tensor([v], dtype=torch.float64) for v in (SIGLIP_SCALE, SIGLIP_BIAS))
    module = SigLipLoss(dist_impl=impl)
    loss, metrics = module.loss_and_metrics(leaf(image), leaf(text), leaf(scale), leaf(bias))
    expected = reference_siglip_metrics(image, text, scale, bias)
    assert 0 < expected["acc_i2t"] < 1 and 0 < expected["acc_t2i"] < 1  # the test can fail
    assert metrics.keys() == expected.keys()
    for name, value in metrics.items():
        assert value.shape == () and value.is_floating_point() and not value.requires_grad, name
        torch.testing.assert_close(value, expected[name].to(value.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(metrics["loss_pos"] + metrics["loss_neg"], loss.detach())
    torch.testing.assert_close(module(image, text, scale, bias), loss.detach())


@pytest.mark.parametrize("impl", DIST_IMPLS)
def test_siglip_scale_and_bias_shape_one_or_scalar(impl: str) -> None:
    image, text = paired_features(8, torch.float64)
    results = []
    for shape in ((), (1,)):
        scalars = [leaf(torch.full(shape, v, dtype=torch.float64)) for v in (10.0, -10.0)]
        loss = SigLipLoss(dist_impl=impl)(image, text, *scalars)
        loss.backward()
        assert loss.shape == () and all(t.grad.shape == shape for t in scalars)
        results.append([loss.detach()] + [t.grad.reshape(()) for t in scalars])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_siglip_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match=r"dist_impl must be one of \('ring', 'gather'\)"):
        SigLipLoss(dist_impl="bidir")
    with pytest.raises(ValueError, match="check_batch_sizes must be one of"):
        SigLipLoss(check_batch_sizes="once")


def test_siglip_ring_saves_only_its_inputs() -> None:
    image, text = paired_features(8, torch.float32)
    saved = saved_for_backward(lambda: run_siglip(SigLipLoss(dist_impl="ring"), image, text))
    assert sorted(saved) == sorted([((8, DIM), 8 * DIM * 4)] * 2 + [((1,), 4)] * 2), saved


def test_rejects_mismatched_feature_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ContrastiveLoss()(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(1.0))


# ----------------------------------------------------------------------------- multi-process


def _distributed_worker(rank: int, world: int) -> dict[str, object]:
    """Runs on every rank: everything the multi-process tests check, in one spawn per W."""
    out: dict[str, object] = {}
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH

    # The gather alone: forward order, and the backward sums every rank's gradient.
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = all_gather_with_grad(x)
    weight = torch.arange(y.numel(), dtype=torch.float64).view_as(y) * (rank + 1)
    (y * weight).sum().backward()
    out["gather"] = (y.detach(), x.grad)

    # The loss on raw features, in both precisions.
    for dtype in (torch.float64, torch.float32):
        image, text = global_features(world * LOCAL_BATCH, dtype)
        image, text = leaf(image[lo:hi]), leaf(text[lo:hi])
        scale = leaf(torch.tensor([SCALE], dtype=dtype))
        loss = ContrastiveLoss()(image, text, scale)
        loss.backward()
        out[str(dtype)] = (loss.detach(), image.grad, text.grad, scale.grad)

    # Through a model: average parameter gradients over ranks as the engine does.
    model = TinyClip()
    images, texts = model_inputs(world * LOCAL_BATCH)
    ContrastiveLoss()(**model(images[lo:hi], texts[lo:hi])).backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        grads[name] = p.grad / world
    out["model"] = grads

    # Unequal local batches must fail loudly, on every rank, before any wrong number exists.
    image, text = global_features(LOCAL_BATCH + rank, torch.float32)
    try:
        ContrastiveLoss()(image, text, torch.tensor(SCALE))
        out["unequal"] = None
    except ValueError as err:
        out["unequal"] = str(err)
    try:
        all_gather_with_grad(torch.zeros(1 + rank, 2))
        out["unequal_gather"] = None
    except ValueError as err:
        out["unequal_gather"] = str(err)

    # The shape check is a collective and a host sync: once per loss module by default (the
    # training loader guarantees equal batches), every call with "always".
    from clipforge.loss import gather

    calls = []
    original = gather.all_gather_sizes
    gather.all_gather_sizes = lambda x: calls.append(1) or original(x)
    try:
        image, text = global_features(world * LOCAL_BATCH, torch.float32)
        for checks in (True, "always"):
            calls.clear()
            module = ContrastiveLoss(check_batch_sizes=checks)
            for _ in range(3):
                module(image[lo:hi], text[lo:hi], torch.tensor([SCALE]))
            out[f"checks {checks}"] = len(calls)
    finally:
        gather.all_gather_sizes = original
    out.update(_siglip_worker(rank, world))
    return out


def _siglip_worker(rank: int, world: int) -> dict[str, object]:
    """The SigLipLoss part of _distributed_worker (same spawn)."""
    out: dict[str, object] = {}
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    for dtype in (torch.float64, torch.float32):
        image, text = paired_features(world * LOCAL_BATCH, dtype)
        image, text = image[lo:hi], text[lo:hi]
        for impl in DIST_IMPLS:
            out[f"siglip {impl} {dtype}"] = run_siglip(SigLipLoss(dist_impl=impl), image, text)
        if world <= 3:  # open_clip's own distributed forms, with its default dist_impl
            theirs = open_clip_loss().SigLipLoss(rank=rank, world_size=world)
            out[f"siglip open_clip {dtype}"] = run_siglip(theirs, image, text)

    # A backward that does not start from 1 (a caller scaling each rank's loss differently):
    # the ring must weigh each rank's share of a text gradient by that rank's grad_output.
    image, text = paired_features(world * LOCAL_BATCH, torch.float64)
    for impl in DIST_IMPLS:
        run = run_siglip(SigLipLoss(dist_impl=impl), image[lo:hi], text[lo:hi], weight=rank + 1)
        out[f"siglip weighted {impl}"] = run["grads"]

    # What each form keeps for backward, at a fixed local batch.
    image, text = paired_features(world * LOCAL_BATCH, torch.float32)
    for impl in DIST_IMPLS:
        module = SigLipLoss(dist_impl=impl)
        out[f"siglip saved {impl}"] = saved_for_backward(
            lambda module=module: run_siglip(module, image[lo:hi], text[lo:hi])
        )

    # Unequal local batches fail on every rank, in both forms.
    image, text = global_features(LOCAL_BATCH + rank, torch.float32)
    for impl in DIST_IMPLS:
        try:
            SigLipLoss(dist_impl=impl)(image, text, torch.tensor(10.0), torch.tensor(-10.0))
            out[f"siglip unequal {impl}"] = None
        except ValueError as err:
            out[f"siglip unequal {impl}"] = str(err)

    # The check's collective runs on the first call only (True), every call, or never.
    from clipforge.loss import gather

    calls = []
    original = gather.all_gather_sizes
    gather.all_gather_sizes = lambda x: calls.append(1) or original(x)
    try:
        image, text = paired_features(world * LOCAL_BATCH, torch.float32)
        for checks in (True, "always", False):
            calls.clear()
            module = SigLipLoss(check_batch_sizes=checks)
            for _ in range(3):
                module(image[lo:hi], text[lo:hi], torch.tensor([10.0]), torch.tensor([-10.0]))
            out[f"siglip checks {checks}"] = len(calls)
    finally:
        gather.all_gather_sizes = original
    return out


_RUNS: dict[int, list[dict[str, object]]] = {}


def distributed_results(world: int) -> list[dict[str, object]]:
    """_distributed_worker's results at `world` ranks: one spawn per W for the whole module."""
    if world not in _RUNS:
        _RUNS[world] = run_distributed(_distributed_worker, world, timeout=120)
    return _RUNS[world]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def distributed(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, object]]]:
    world = request.param
    return world, distributed_results(world)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def siglip_distributed(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, object]]]:
    world = request.param
    return world, distributed_results(world)


@pytest.mark.multiproc
def test_gather_concatenates_by_rank_and_sums_gradients(distributed) -> None:
    world, results = distributed
    expected_y = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)]).double()
    # Rank q's backward weight on the gathered tensor is arange * (q + 1); rank r's slice gets
    # the sum over q, i.e. arange[slice r] * sum(q + 1).
    total = sum(q + 1 for q in range(world))
    ramp = torch.arange(world * 6, dtype=torch.float64).view(world * 2, 3)
    for rank, out in enumerate(results):
        y, grad = out["gather"]
        torch.testing.assert_close(y, expected_y, atol=0, rtol=0)
        torch.testing.assert_close(grad, ramp[2 * rank : 2 * rank + 2] * total, atol=0, rtol=0)


@pytest.mark.multiproc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_loss_equals_global_batch(distributed, dtype: torch.dtype) -> None:
    world, results = distributed
    image, text = global_features(world * LOCAL_BATCH, dtype)
    image, text = leaf(image), leaf(text)
    scale = leaf(torch.tensor([SCALE], dtype=dtype))
    expected = reference_loss(image, text, scale)
    expected.backward()

    per_rank = [out[str(dtype)] for out in results]
    tol = TOL[dtype]
    mean_loss = torch.stack([loss for loss, *_ in per_rank]).mean()
    torch.testing.assert_close(mean_loss, expected.detach(), atol=tol, rtol=0)
    for rank, (_, image_grad, text_grad, _) in enumerate(per_rank):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(image_grad / world, image.grad[rows], atol=tol, rtol=0)
        torch.testing.assert_close(text_grad / world, text.grad[rows], atol=tol, rtol=0)
    mean_scale_grad = torch.stack([scale_grad for *_, scale_grad in per_rank]).mean(0)
    torch.testing.assert_close(mean_scale_grad, scale.grad, atol=tol, rtol=0)


@pytest.mark.multiproc
@pytest.mark.parametrize("impl", DIST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_siglip_equals_global_batch(
    siglip_distributed, dtype: torch.dtype, impl: str
) -> None:
    world, results = siglip_distributed
    image, text = paired_features(world * LOCAL_BATCH, dtype)
    leaves = [leaf(image), leaf(text), *siglip_leaves(dtype)]
    expected = reference_siglip(*leaves)
    expected.backward()

    per_rank = [out[f"siglip {impl} {dtype}"] for out in results]
    tol = TOL[dtype]
    mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
    torch.testing.assert_close(mean_loss, expected.detach(), atol=tol, rtol=0)
    for rank, r in enumerate(per_rank):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for local_grad, full in zip(r["grads"][:2], leaves[:2], strict=True):
            torch.testing.assert_close(local_grad / world, full.grad[rows], atol=tol, rtol=0)
    for i, full in enumerate(leaves[2:], start=2):
        mean_grad = torch.stack([r["grads"][i] for r in per_rank]).mean(0)
        torch.testing.assert_close(mean_grad, full.grad, atol=tol, rtol=0)

    # Each rank's metrics, averaged over ranks, are the global batch's.
    reference = reference_siglip_metrics(image, text, *siglip_leaves(dtype))
    for name, value in reference.items():
        mean = torch.stack([r["metrics"][name] for r in per_rank]).mean()
        torch.testing.assert_close(mean, value.to(mean.dtype), atol=tol, rtol=0, msg=name)


@pytest.mark.multiproc
def test_siglip_ring_equals_gather(siglip_distributed) -> None:
    _, results = siglip_distributed
    for out in results:
        for dtype in (torch.float64, torch.float32):
            ring, gathered = out[f"siglip ring {dtype}"], out[f"siglip gather {dtype}"]
            tol = TOL[dtype]
            _assert_same_loss_and_grads(ring, gathered, tol)
            assert ring["metrics"].keys() == gathered["metrics"].keys()
            for name, value in ring["metrics"].items():
                expected = gathered["metrics"][name]
                torch.testing.assert_close(value, expected, atol=tol, rtol=0, msg=name)
        ring, gathered = out["siglip weighted ring"], out["siglip weighted gather"]
        for a, b in zip(ring, gathered, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.multiproc
def test_siglip_matches_open_clip_distributed(distributed) -> None:
    _, results = distributed
    for out in results:
        for dtype in (torch.float64, torch.float32):
            ours, theirs = out[f"siglip ring {dtype}"], out[f"siglip open_clip {dtype}"]
            _assert_same_loss_and_grads(ours, theirs, TOL[dtype])


def _assert_same_loss_and_grads(a: dict, b: dict, tol: float) -> None:
    torch.testing.assert_close(a["loss"], b["loss"], atol=tol, rtol=0)
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        torch.testing.assert_close(ga, gb, atol=tol, rtol=0)


@pytest.mark.multiproc
def test_siglip_ring_memory_does_not_grow_with_world() -> None:
    # Fixed local batch: the ring keeps the same bytes for backward at W = 2 and 4 (its local
    # inputs), while the gather form keeps the [N, D] texts and grows.
    saved = {
        (world, impl): [out[f"siglip saved {impl}"] for out in distributed_results(world)]
        for world in (2, 4)
        for impl in DIST_IMPLS
    }

    def total(world: int, impl: str) -> set[int]:
        return {sum(nbytes for _, nbytes in per_rank) for per_rank in saved[world, impl]}

    assert total(2, "ring") == total(4, "ring") == {2 * LOCAL_BATCH * DIM * 4 + 2 * 4}
    assert min(total(4, "gather")) > max(total(2, "gather")) > max(total(2, "ring"))
    n = 4 * LOCAL_BATCH
    assert all(n not in shape for per_rank in saved[4, "ring"] for shape, _ in per_rank)
    assert all(any(n in shape for shape, _ in per_rank) for per_rank in saved[4, "gather"])


@pytest.mark.multiproc
def test_siglip_unequal_local_batches_raise_on_every_rank(siglip_distributed) -> None:
    world, results = siglip_distributed
    for out in results:
        for impl in DIST_IMPLS:
            message = out[f"siglip unequal {impl}"]
            assert message is not None, f"{impl}: unequal local batch sizes did not raise"
            assert "SigLipLoss [batch, dim] needs the same shape on every rank" in message
            for rank in range(world):
                assert f"rank {rank}: [{LOCAL_BATCH + rank}, {DIM}]" in message


@pytest.mark.multiproc
def test_siglip_batch_shape_check_runs_once(siglip_distributed) -> None:
    _, results = siglip_distributed
    for r in results:
        counts = [r[f"siglip checks {c}"] for c in (True, "always", False)]
        assert counts == [1, 3, 0], counts


@pytest.mark.multiproc
def test_rank_averaged_parameter_gradients_equal_global_batch(distributed) -> None:
    world, results = distributed
    model = TinyClip()
    images, texts = model_inputs(world * LOCAL_BATCH)
    out = model(images, texts)
    reference_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    for rank_out in results:
        for name, p in model.named_parameters():
            torch.testing.assert_close(rank_out["model"][name], p.grad, atol=1e-5, rtol=0)


@pytest.mark.multiproc
def test_unequal_local_batches_raise_on_every_rank(distributed) -> None:
    world, results = distributed
    for out in results:
        assert out["unequal_gather"] is not None, "all_gather_with_grad accepted unequal shapes"
        message = out["unequal"]
        assert message is not None, "unequal local batch sizes did not raise"
        assert "ContrastiveLoss [batch, dim] needs the same shape on every rank" in message
        for rank in range(world):
            assert f"rank {rank}: [{LOCAL_BATCH + rank}, {DIM}]" in message
            assert f"rank {rank}: [{1 + rank}, 2]" in out["unequal_gather"]


@pytest.mark.multiproc
def test_batch_shape_check_runs_once(distributed) -> None:
    _, results = distributed
    for r in results:
        assert r["checks True"] == 1 and r["checks always"] == 3, r
