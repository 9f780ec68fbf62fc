"""cam_engine.targets: which inputs are class ids, and the errors for the others."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images

import cam_engine as ce
from cam_engine import targets as T

LOGITS = torch.tensor([[0.5, 2.0, -1.0, 3.0], [1.5, -2.0, 0.0, 0.25]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (np.int64(2), [[2], [2]]),
        (np.uint8(3), [[3], [3]]),
        (torch.tensor(1), [[1], [1]]),
        (torch.tensor(0, dtype=torch.int32), [[0], [0]]),
        (np.array([3, 0]), [[3], [0]]),
        (np.array([[1, 2], [0, 3]], dtype=np.int32), [[1, 2], [0, 3]]),
        (np.array([1, 2], dtype=np.uint64), [[1], [2]]),
        ([np.int64(1), 2], [[1], [2]]),
        ((3, 1), [[3], [1]]),
        ([[0, 1], [2, 3]], [[0, 1], [2, 3]]),
        (None, [[3], [0]]),
        (ce.TopK(2), [[3, 1], [0, 3]]),
    ],
)
def test_class_ids_accepted(targets, expected):
    resolved = T.resolve(targets, LOGITS)
    assert resolved.one_hot and resolved.classes.dtype == torch.long
    assert resolved.classes.tolist() == expected
    rows = torch.tensor([1, 0])
    torch.testing.assert_close(
        resolved.scores(LOGITS, rows), LOGITS.gather(1, torch.tensor(expected)[rows])
    )


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        ("cat", "got str"),
        (b"\x01\x02", "got bytes"),
        ({1: 2}, "got dict"),
        ({1, 2}, "got set"),
        ([None, 1], "got NoneType"),
        (["a", "b"], "got str"),
        ([0, True], "bool"),
        ([[0, 1], [2, False]], "bool"),
        (np.bool_(True), "bool"),
        (np.array([True, False]), "bool"),
        (torch.tensor([True, False]), "bool"),
        (True, "bool"),
        (2.5, "float"),
        (2.0, "float"),
        ([1, 2.5], "float"),
        (np.float32(1.0), "float"),
        (np.array([1.0, 2.0]), "float"),
        (torch.tensor([0.0, 1.0]), "float"),
        (torch.tensor(1.0), "float"),
        (2**70, "out of range"),
        (np.array([2**63 + 5, 1], dtype=np.uint64), "out of range"),
        (torch.tensor(7), "out of range"),
        ([1, 2, 3], r"shape \(3,\) do not fit a batch of 2"),
        (torch.zeros(2, 1, 1, dtype=torch.long), r"shape \(2, 1, 1\) do not fit"),
    ],
)
def test_bad_class_ids_raise_value_error(targets, match):
    with pytest.raises(ValueError, match=match):
        T.resolve(targets, LOGITS)
    with pytest.raises(ValueError, match=match):
        T.resolve_classes(targets, LOGITS)


def test_type_error_says_what_is_accepted():
    with pytest.raises(ValueError, match=r"TopK.*function"):
        T.resolve("cat", LOGITS)


def test_is_class_ids():
    def fn(out):
        return out[:, :1]

    for targets in (None, 3, np.int64(1), [1, 2], torch.tensor([0, 1]), ce.TopK(2), ce.BottomK()):
        assert T.is_class_ids(targets)
    for targets in (fn, T.SoftmaxScore(), T.BinaryScore()):
        assert not T.is_class_ids(targets)
    assert T.is_class_ids(T.resolve([1, 2], LOGITS))
    assert not T.is_class_ids(T.resolve(fn, LOGITS))
    assert not T.is_class_ids(T.resolve(T.SoftmaxScore(), LOGITS))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_score_function_raises(bad):
    def fn(out):
        scores = out[:, :2].clone()
        scores[1, 1] = bad
        return scores

    with pytest.raises(ValueError, match=rf"non-finite.*{bad}.*image 1, target 1"):
        T.resolve(fn, LOGITS)


def test_non_finite_scores_of_a_later_call_raise():
    # finite on the logits the targets are resolved with, not on another output (a masked input)
    resolved = T.resolve(lambda out: out[:, :2].log(), LOGITS.abs())
    other = LOGITS.abs()
    other[0, 1] = -1.0
    with pytest.raises(ValueError, match=r"1 non-finite score \(nan for image 1, target 1\)"):
        resolved.scores(other, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"4 non-finite scores \(nan for image 1, target 0, the"):
        resolved.scores(-LOGITS.abs(), torch.tensor([1, 0]))


def test_engine_numpy_class_id_equals_int(resnet18):
    engine = ce.CAMEngine(resnet18, "layer4")
    x = images(2, 64)
    res = engine(x, targets=np.int64(7))
    assert res.classes.tolist() == [[7], [7]]
    torch.testing.assert_close(res.heatmaps, engine(x, targets=7).heatmaps, rtol=0, atol=0)
    res = engine(x, targets=np.array([3, 9]))
    torch.testing.assert_close(res.heatmaps, engine(x, targets=[3, 9]).heatmaps, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("targets", "match"),
    [("cat", "got str"), ([0, True], "bool"), (torch.tensor([2.0, 1.0]), "float")],
)
def test_engine_bad_targets_raise_value_error(resnet18, targets, match):
    with pytest.raises(ValueError, match=match):
        ce.CAMEngine(resnet18, "layer4")(images(2, 64), targets=targets)


def test_engine_nan_score_function_raises(resnet18):
    engine = ce.CAMEngine(resnet18, "layer4")
    with pytest.raises(ValueError, match="non-finite"):
        engine(images(2, 64), targets=lambda out: out[:, :1] * float("nan"))
