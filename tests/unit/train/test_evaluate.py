"""dtl.train.evaluate: the one evaluation loop (sums, top-k, confusion) against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtl.distributed import ProcessGroups
from dtl.train.evaluate import evaluate, tta_logits
from dtl.train.optimisation.precision import Precision

CPU = torch.device("cpu")
FP32 = Precision("fp32", CPU)


def test_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(6, 7)
    x, y = torch.randn(50, 6), torch.randint(0, 7, (50,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    model.train()
    result = evaluate(model, batches, CPU, ProcessGroups(), FP32, 7, confusion=True, desc=None)
    assert model.training  # the caller's mode is restored
    with torch.no_grad():
        logits = model(x)
    assert result.count == 50
    torch.testing.assert_close(result.loss, nn.functional.cross_entropy(logits, y).item(), rtol=1e-6, atol=0)
    assert result.top1 == (logits.argmax(1) == y).sum().item() / 50
    assert result.top5 == (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item() / 50
    expected = torch.bincount(y * 7 + logits.argmax(1), minlength=49).view(7, 7)
    assert torch.equal(result.confusion, expected)


def test_fewer_than_five_classes_and_no_confusion_by_default():
    model = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    result = evaluate(model, batches, CPU, ProcessGroups(), FP32, 3, desc=None)
    assert result.top5 == 1.0 and result.confusion is None


def images_and_model() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, 6, 6), torch.randint(0, 4, (20,))
    return x, y, nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 4))


def test_flip_tta_is_the_mean_of_the_logits_of_the_image_and_its_mirror():
    x, y, model = images_and_model()
    with torch.no_grad():
        plain, tta = tta_logits(model, x, "flip")
        assert torch.equal(plain, model(x))
        assert torch.equal(tta, (model(x) + model(x.flip(-1))) / 2)
        none = tta_logits(model, x, "none")
        assert none[0] is none[1]  # none: one forward
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    flip = evaluate(model, batches, CPU, ProcessGroups(), FP32, 4, confusion=True, desc=None, tta="flip")
    plain_result = evaluate(model, batches, CPU, ProcessGroups(), FP32, 4, desc=None)
    assert flip.plain == plain_result  # the un-augmented numbers of the same pass
    assert flip.top1 == (tta.argmax(1) == y).sum().item() / 20
    torch.testing.assert_close(flip.loss, nn.functional.cross_entropy(tta, y).item(), rtol=1e-6, atol=0)
    assert flip.confusion.diagonal().sum().item() == round(flip.top1 * 20)  # the headline (TTA) predictions


def test_a_mirror_symmetric_model_scores_the_same_with_flip_tta():
    x, y, _ = images_and_model()
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))  # sees no left or right
    batches = [(x, y)]
    flip = evaluate(model, batches, CPU, ProcessGroups(), FP32, 4, desc=None, tta="flip")
    assert flip.top1 == flip.plain.top1 and flip.count == 20
    torch.testing.assert_close(flip.loss, flip.plain.loss)


def test_runs_the_model_without_its_ddp_and_compile_wrappers():
    model = nn.Linear(4, 3)
    compiled = torch.compile(model, backend="eager")
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(m))
    evaluate(compiled, [(torch.randn(2, 4), torch.tensor([0, 1]))], CPU, ProcessGroups(), FP32, 3, desc=None)
    assert seen == [model]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_confusion_matrix_needs_no_host_sync():
    from dtl.train.evaluate import evaluate

    labels = torch.randint(0, 10, (64,), device="cuda")
    batches = [(torch.randn(64, 10, device="cuda"), labels)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            totals_model = nn.Identity().cuda()
            # only the final all-reduce/.tolist() may sync: run the per-batch part under the sync guard
            classes = torch.arange(10, device="cuda")
            for logits, y in batches:
                pred = logits.argmax(1)
                ((y[:, None] == classes).float().T @ (pred[:, None] == classes).float()).long()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    result = evaluate(totals_model, batches, torch.device("cuda"), ProcessGroups(), FP32, 10, confusion=True)
    assert result.count == 64 and int(result.confusion.sum()) == 64
