"""cam_engine.compat against pytorch-grad-cam: its README's code, only the import line changed.

Each example is one source text run twice, once under pytorch-grad-cam's imports and once under
cam_engine.compat's; the arrays must agree within 1e-5 (resnet18 at 64 px, float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images

pytest.importorskip("pytorch_grad_cam")

import cam_engine as ce  # noqa: E402
from cam_engine import compat  # noqa: E402

PGC_IMPORTS = """
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, XGradCAM, EigenCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
"""
COMPAT_IMPORTS = """
from cam_engine.compat import GradCAM, GradCAMPlusPlus, XGradCAM, EigenCAM, LayerCAM, ScoreCAM
from cam_engine.compat import ClassifierOutputTarget, ClassifierOutputSoftmaxTarget
"""

# pytorch-grad-cam's README example, with a batch of two and the method a parameter
README_EXAMPLE = """
target_layers = [{layer}]
targets = [ClassifierOutputTarget(281), ClassifierOutputTarget(7)]
with {method}(model=model, target_layers=target_layers) as cam:
    grayscale_cam = cam(input_tensor=input_tensor, targets=targets,
                        aug_smooth={aug}, eigen_smooth={eigen})
    model_outputs = cam.outputs
"""


@pytest.fixture(autouse=True)
def _no_grads_left(resnet18):
    """pytorch-grad-cam's backward leaves .grad on the shared resnet18; later tests check that
    the engine leaves none, so they are dropped after each test."""
    yield
    resnet18.zero_grad(set_to_none=True)


def _run(imports: str, code: str, **names) -> dict:
    scope = dict(names)
    exec(imports + code, scope)  # noqa: S102 - the examples are this file's own text
    return scope


def _both(code: str, **names) -> tuple[dict, dict]:
    return _run(PGC_IMPORTS, code, **names), _run(COMPAT_IMPORTS, code, **names)


@pytest.mark.parametrize(
    ("method", "aug", "eigen", "layer", "size"),
    [
        ("GradCAM", False, False, "model.layer4[-1]", 64),
        ("GradCAM", True, False, "model.layer4[-1]", 64),
        ("GradCAM", False, True, "model.layer4[-1]", 64),
        ("GradCAMPlusPlus", False, False, "model.layer4[-1]", 64),
        ("XGradCAM", False, False, "model.layer4[-1]", 64),
        ("EigenCAM", False, False, "model.layer4[-1]", 64),
        ("LayerCAM", False, True, "model.layer4[-1]", 64),
        # Score-CAM runs the model once per channel: layer2's 128, on 16 px images
        ("ScoreCAM", False, False, "model.layer2", 16),
    ],
)
def test_the_readme_example_gives_pytorch_grad_cams_arrays(
    resnet18, method, aug, eigen, layer, size
):
    x = images(2, size)
    code = README_EXAMPLE.format(method=method, aug=aug, eigen=eigen, layer=layer)
    theirs, ours = _both(code, model=resnet18, input_tensor=x)
    got, want = ours["grayscale_cam"], theirs["grayscale_cam"]
    assert got.dtype == np.float32 and got.shape == want.shape == (2, size, size)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if not aug:  # pytorch-grad-cam keeps its last view's outputs, cam_engine the image's
        torch.testing.assert_close(ours["model_outputs"], theirs["model_outputs"].detach())


def test_softmax_other_and_no_targets_give_pytorch_grad_cams_arrays(resnet18):
    """Softmax targets, a mix with a plain function of the output row, and top-1 (None); two
    layers fused. Softmax maps are tiny (1e-4) on this random model: pytorch-grad-cam's 1e-7 in
    its per-layer normalisation would show in a fusion, so they are checked at one layer."""
    code = """
softmax = [ClassifierOutputSoftmaxTarget(3), ClassifierOutputSoftmaxTarget(5)]
mixed = [ClassifierOutputTarget(3), lambda row: row[5] - row[6]]
with GradCAM(model=model, target_layers=[model.layer4]) as cam:
    maps = [cam(input_tensor=input_tensor, targets=softmax)]
with GradCAM(model=model, target_layers=[model.layer3, model.layer4]) as cam:
    maps += [cam(input_tensor=input_tensor, targets=t) for t in (mixed, None)]
"""
    theirs, ours = _both(code, model=resnet18, input_tensor=images(2, 64))
    for got, want in zip(ours["maps"], theirs["maps"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "layers", "base", "targets"),
    [
        (
            "HiResCAM",
            "[model.layer4]",
            None,
            "[ClassifierOutputTarget(3), ClassifierOutputTarget(9)]",
        ),
        ("FullGrad", "[]", None, "None"),
        ("FinerCAM", "[model.layer4]", None, "None"),
        ("FinerCAM", "[model.layer4]", "LayerCAM", "[ClassifierOutputTarget(3)] * 2"),
        ("RefineCAM", "[model.layer3, model.layer4]", "LayerCAM", "None"),
    ],
)
def test_more_methods_give_pytorch_grad_cams_arrays(resnet18, method, layers, base, targets):
    """Methods with their own ways: FullGrad (every bias), FinerCAM (top-1 against its nearest
    classes), RefineCAM (the base maps of all layers multiplied, one engine method)."""
    imports = "from {0} import HiResCAM, FullGrad, FinerCAM, RefineCAM, LayerCAM\n"
    code = f"""
cam = {method}(model, {layers}{f", base_method={base}" if base else ""})
grayscale_cam = cam(input_tensor, {targets})
"""
    names = {"model": resnet18, "input_tensor": images(2, 64)}
    theirs = _run(PGC_IMPORTS + imports.format("pytorch_grad_cam"), code, **names)
    ours = _run(COMPAT_IMPORTS + imports.format("cam_engine.compat"), code, **names)
    np.testing.assert_allclose(ours["grayscale_cam"], theirs["grayscale_cam"], atol=1e-5)


def test_pytorch_grad_cams_target_objects_are_accepted(resnet18):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images(2, 64)
    cam = compat.GradCAM(resnet18, [resnet18.layer4])
    theirs = cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    ours = cam(x, [compat.ClassifierOutputTarget(1), compat.ClassifierOutputTarget(2)])
    np.testing.assert_array_equal(theirs, ours)
    assert compat.engine_targets([ClassifierOutputTarget(4)], 1) == [4]


def test_bad_layers_and_targets_raise(resnet18):
    other = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError) as engine_error:
        ce.CAMEngine(resnet18, other)
    with pytest.raises(ValueError, match="a Conv2d that is not a module of this model") as error:
        compat.GradCAM(resnet18, [other])
    assert str(error.value) == str(engine_error.value)  # one check, one message
    with pytest.raises(ValueError, match="target_layers is empty"):
        compat.GradCAM(resnet18, [])
    cam = compat.GradCAM(resnet18, [resnet18.layer4])
    with pytest.raises(ValueError, match="one per image: 1 targets for a batch of 2"):
        cam(images(2, 32), [compat.ClassifierOutputTarget(1)])


def test_finercam_takes_a_base_method_class(resnet18):
    cam = compat.FinerCAM(resnet18, [resnet18.layer4], base_method=compat.LayerCAM)
    assert cam._engine(False).method_options.base == "layercam"
    with pytest.raises(ValueError, match="unknown base_method 'Conv2d'"):
        compat.FinerCAM(resnet18, [resnet18.layer4], base_method=torch.nn.Conv2d)


def test_every_method_class_names_an_engine_method():
    import pytorch_grad_cam

    import cam_engine as ce

    assert set(compat.METHODS.values()) <= set(ce.methods.available())
    assert all(hasattr(pytorch_grad_cam, name) for name in compat.METHODS)


@pytest.mark.parametrize(("use_rgb", "weight"), [(True, 0.5), (False, 0.3)])
def test_show_cam_on_image_matches_pytorch_grad_cams_within_one_colour_step(use_rgb, weight):
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rng = np.random.default_rng(0)
    img = rng.random((16, 20, 3), dtype=np.float32)
    # every level of the colour map, and the mask's truncation to uint8 at each level's edge
    mask = np.concatenate([np.arange(256) / 255, np.arange(64) / 255 + 0.5 / 255])
    mask = rng.permutation(mask).reshape(16, 20).astype(np.float32)
    got = compat.show_cam_on_image(img, mask, use_rgb=use_rgb, image_weight=weight)
    want = show_cam_on_image(img, mask, use_rgb=use_rgb, image_weight=weight)
    assert got.dtype == np.uint8 and got.shape == (16, 20, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_show_cam_on_image_rejects_what_pytorch_grad_cam_rejects():
    img, mask = np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="range \\[0, 1\\]"):
        compat.show_cam_on_image(img + 2, mask)
    with pytest.raises(ValueError, match="image_weight"):
        compat.show_cam_on_image(img, mask, image_weight=1.5)
    with pytest.raises(ValueError, match="OpenCV colormap 4 has no equivalent"):
        compat.show_cam_on_image(img, mask, colormap=4)


# --- OrtCAM: NumPy in, NumPy out; one keyword for classes ---------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A top-2 file and a Grad-CAM file with a classes input, of a tiny stride-4 net at 32 px."""
    from test_export_files import TinyNet

    from cam_engine.export import OrtCAM, to_onnx

    torch.manual_seed(0)
    net, folder = TinyNet().eval(), tmp_path_factory.mktemp("ort")
    top2 = to_onnx(net, folder / "top2.onnx", "features", topk=2, input_size=(32, 32))
    given = to_onnx(
        net, folder / "given.onnx", "features", method="gradcam", input_size=(32, 32),
        classes_input=True,
    )  # fmt: skip
    return OrtCAM(top2.path, device="cpu"), OrtCAM(given.path, device="cpu")


def test_ort_cam_takes_numpy_images_and_returns_numpy(tiny_files):
    top2, given = tiny_files
    x = images(2, 32, torch.float32)
    for cam, targets in ((top2, None), (given, [[1, 4], [0, 5]])):
        want = cam(x, targets)
        got = cam(x.numpy().astype(np.float64), targets)  # any float dtype, as tensors
        for name in ("heatmaps", "logits", "classes"):
            array = getattr(got, name)
            assert isinstance(array, np.ndarray), name
            np.testing.assert_array_equal(array, getattr(want, name).numpy())
        outputs = cam.run(x.numpy(), targets)
        assert all(isinstance(v, np.ndarray) for v in outputs.values())
        np.testing.assert_array_equal(outputs["heatmaps"], want.heatmaps.numpy())
    with pytest.raises(ValueError, match="floating-point images, got NumPy uint8"):
        top2(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        top2(np.zeros((0, 3, 32, 32), np.float32))


def test_ort_cam_call_and_run_take_the_same_keywords(tiny_files):
    _, given = tiny_files
    x = images(2, 32, torch.float32)
    want = given.run(x, [[1, 4], [0, 5]])  # the old positional spelling
    for keyword in ("targets", "classes"):
        outputs = given.run(x, **{keyword: [[1, 4], [0, 5]]})
        result = given(x, **{keyword: [[1, 4], [0, 5]]})
        for name in ("heatmaps", "logits", "classes"):
            torch.testing.assert_close(outputs[name], want[name], rtol=0, atol=0)
            torch.testing.assert_close(getattr(result, name), want[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        given(x, targets=1, classes=1)
    with pytest.raises(ValueError, match="not both"):
        given.run(x, 1, classes=1)
