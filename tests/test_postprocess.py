"""cam_engine.postprocess against independent references (OpenCV, matplotlib, NumPy loops)."""

import ast
import doctest
import inspect

import cv2
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import images
from torch.utils._python_dispatch import TorchDispatchMode

import cam_engine as ce
from cam_engine import postprocess as P

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rng(seed=0):
    return np.random.default_rng(seed)


def _cv2_jet_rgb():
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8), cv2.COLORMAP_JET)
    return lut.reshape(256, 3)[:, ::-1].astype(np.int64)


def _mpl_lut(name):
    return np.round(matplotlib.colormaps[name](np.arange(256) / 255)[:, :3] * 255).astype(np.int64)


# upsample ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"), [((7, 7), (224, 224)), ((5, 9), (37, 20)), ((14, 14), (5, 6))]
)
def test_upsample_matches_cv2_inter_linear(src, dst):
    cams = _rng().standard_normal((2, 3, *src)).astype(np.float32)
    out = P.upsample(torch.from_numpy(cams), dst)
    assert out.shape == (2, 3, *dst) and out.dtype == torch.float32
    for b in range(2):
        for k in range(3):
            ref = cv2.resize(cams[b, k], (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(out[b, k].numpy(), ref, atol=1e-5, rtol=0)


def test_upsample_same_size_is_identity():
    cams = torch.rand(2, 3, 8, 9)
    assert P.upsample(cams, (8, 9)) is cams
    assert P.upsample(cams, torch.Size([8, 9])) is cams


def test_upsample_int_size():
    assert P.upsample(torch.rand(1, 2, 4, 4), 10).shape == (1, 2, 10, 10)


def test_upsample_3d_trilinear():
    vol = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64)
    out = P.upsample(vol, (8, 10, 12))
    assert out.shape == (2, 3, 8, 10, 12) and out.dtype == torch.float64
    ref = F.interpolate(vol, size=(8, 10, 12), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    const = torch.full((1, 1, 3, 3, 3), 0.25)
    torch.testing.assert_close(P.upsample(const, (7, 7, 7)), torch.full((1, 1, 7, 7, 7), 0.25))


@pytest.mark.parametrize("dtype", FLOATS)
def test_upsample_keeps_dtype(dtype):
    cams = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    out = P.upsample(cams.to(dtype), (20, 30))
    assert out.dtype == dtype
    ref = P.upsample(cams.to(dtype).double(), (20, 30))
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)


def test_upsample_errors():
    with pytest.raises(ValueError, match="spatial"):
        P.upsample(torch.rand(1, 2, 4, 4), (8, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        P.upsample(torch.ones(1, 2, 4, 4, dtype=torch.int64), (8, 8))
    with pytest.raises(ValueError, match="B, K"):
        P.upsample(torch.rand(2, 4, 4), (8, 8))


# normalize ---------------------------------------------------------------------------------------


def _np_minmax(maps):
    flat = maps.reshape(*maps.shape[:2], -1).astype(np.float64)
    lo, hi = flat.min(-1, keepdims=True), flat.max(-1, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (flat - lo) / np.where(span > 0, span, 1), 0.0)
    return out.reshape(maps.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_matches_numpy(dtype):
    maps = _rng(1).standard_normal((3, 4, 6, 7)) * 5 + 2
    out = P.normalize(torch.from_numpy(maps).to(dtype))
    assert out.dtype == dtype and out.shape == maps.shape
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(out.double().numpy(), _np_minmax(maps), atol=atol, rtol=0)


def test_normalize_hand_computed():
    maps = torch.tensor([[[[1.0, 3.0], [5.0, 2.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    torch.testing.assert_close(P.normalize(maps), expected, rtol=0, atol=0)


def test_normalize_flat_maps_become_zero():
    maps = torch.rand(2, 3, 5, 5)
    maps[0, 1] = 7.0
    maps[1, 2] = 0.0
    out = P.normalize(maps)
    assert torch.equal(out[0, 1], torch.zeros(5, 5))
    assert torch.equal(out[1, 2], torch.zeros(5, 5))
    assert torch.equal(out[0, 0].min(), torch.tensor(0.0))
    assert torch.equal(out[0, 0].max(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, 1e-13), (torch.float64, 1e-13), (torch.float64, 1e-300)]
)
def test_normalize_tiny_maps_reach_exact_unit_range(dtype, scale):
    maps = torch.rand(4, 3, 9, 9, dtype=torch.float64).mul(scale).to(dtype)
    out = P.normalize(maps)
    flat = out.flatten(2)
    assert torch.all(flat.amin(-1) == 0)
    assert torch.all(flat.amax(-1) == 1)
    assert torch.all((out >= 0) & (out <= 1))
    np.testing.assert_allclose(out.numpy(), _np_minmax(maps.numpy()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalize_half_keeps_dtype(dtype):
    maps = torch.randn(2, 3, 6, 6).mul(100).to(dtype)
    out = P.normalize(maps)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.double().numpy(), _np_minmax(maps.double().numpy()), atol=1e-2)
    assert torch.all(out.flatten(2).amax(-1) == 1) and torch.all(out.flatten(2).amin(-1) == 0)


def test_normalize_3d_and_errors():
    vol = torch.rand(2, 2, 3, 4, 5, dtype=torch.float64)
    np.testing.assert_allclose(P.normalize(vol).numpy(), _np_minmax(vol.numpy()), atol=1e-12)
    with pytest.raises(ValueError, match="at least one dim"):
        P.normalize(torch.tensor(2.0))
    with pytest.raises(ValueError, match="floating"):
        P.normalize(torch.ones(1, 1, 3, 3, dtype=torch.int32))


def test_normalize_lone_map_and_vector():
    lone = torch.tensor([[1.0, 3.0, 2.0], [5.0, 2.0, 1.0]])
    expected = torch.tensor([[0.0, 0.5, 0.25], [1.0, 0.25, 0.0]])
    torch.testing.assert_close(P.normalize(lone), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        P.normalize(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]), rtol=0, atol=0
    )
    assert torch.equal(P.normalize(torch.full((4, 5), 3.0)), torch.zeros(4, 5))


def _ulps(dtype, n):
    """[[1, 1 + n ulps]] as a (1, 1, 1, 2) map of ``dtype``."""
    pair = [[[[1.0, 1.0 + n * torch.finfo(dtype).eps]]]]
    return torch.tensor(pair, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_flat_up_to_rounding_is_zero(dtype):
    # the range is compared with the map's magnitude in its own dtype's ulps (16 of them)
    zeros = torch.zeros(1, 1, 1, 2, dtype=dtype)
    for scale in (1.0, 1e-13, -3e5):
        assert torch.equal(P.normalize(_ulps(dtype, 1) * scale), zeros)
        assert torch.equal(P.normalize(_ulps(dtype, 8) * scale), zeros)
        spread = P.normalize(_ulps(dtype, 64) * scale).flatten()
        assert sorted(spread.tolist()) == [0.0, 1.0]
    # 1e-6 relative contrast: below float32's resolution of the map, real in float64
    maps = 1e-13 * (1 + 1e-6 * torch.tensor([[[[0.0, 0.25], [1.0, 0.5]]]], dtype=torch.float64))
    expected = torch.tensor([[[[0.0, 0.25], [1.0, 0.5]]]], dtype=torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(P.normalize(maps), expected, rtol=0, atol=1e-9)
    else:
        assert torch.equal(P.normalize(maps.float()), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1.55, 7.3e-13, 4.2e8])
def test_heatmaps_of_constant_map_are_zero(dtype, value):
    # bilinear resizing of a constant leaves 1-ulp ripples; they are not stretched to [0, 1]
    for src in ((1, 1), (3, 5)):
        cams = torch.full((1, 1, *src), value, dtype=dtype)
        assert torch.equal(P.heatmaps(cams, (224, 224)), torch.zeros(1, 1, 224, 224, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heatmaps_batch_with_some_flat_maps(dtype):
    cams = torch.rand(3, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cams[0, 1] = 1.55
    cams[2, 0] = 3e-13
    cams[1, 0] *= 1e-13  # low magnitude, not flat
    out = P.heatmaps(cams.to(dtype), (31, 45))
    src = cams.to(dtype).double().numpy()
    ref = np.stack(
        [[cv2.resize(m, (45, 31), interpolation=cv2.INTER_LINEAR) for m in row] for row in src]
    )
    flat = np.zeros((3, 2, 1, 1), dtype=bool)
    flat[0, 1] = flat[2, 0] = True
    expected = np.where(flat, 0.0, _np_minmax(ref))
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5, rtol=0)
    assert torch.equal(out[0, 1], torch.zeros(31, 45, dtype=dtype))
    assert torch.equal(out[2, 0], torch.zeros(31, 45, dtype=dtype))
    lo, hi = out.flatten(2).aminmax(dim=-1)
    assert torch.equal(hi, torch.tensor(~flat.reshape(3, 2), dtype=dtype))
    assert torch.all(lo == 0)


def test_engine_maps_of_a_1x1_layer_are_zero(resnet18):
    # avgpool's (B, 512, 1, 1) output: every map is one value, so flat
    res = ce.CAMEngine(resnet18, "avgpool")(images(2, 64))
    assert res.cams.shape == (2, 1, 1, 1) and torch.all(res.cams > 0.1)
    assert torch.equal(res.heatmaps, torch.zeros(2, 1, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("eps", [1e-7, 1e-8])
def test_normalize_peer_epsilon(eps):
    maps = _rng(4).random((2, 3, 5, 6)) * np.array([1.0, 1e-6, 1e-13])[:, None, None]
    maps[1, 2] = 0.5
    flat = maps.reshape(2, 3, -1)
    lo, hi = flat.min(-1, keepdims=True), flat.max(-1, keepdims=True)
    expected = ((flat - lo) / (hi - lo + eps)).reshape(maps.shape)
    out = P.normalize(torch.from_numpy(maps), eps=eps)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=0)
    assert out[0, 2].max() < 1e-5  # what the epsilon does to a 1e-13 map


# heatmaps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_heatmaps_upsample_then_normalize(dtype):
    cams = torch.rand(2, 3, 7, 7, dtype=torch.float64).to(dtype)
    out = P.heatmaps(cams, (32, 40))
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == (2, 3, 32, 40)
    src = cams.double().numpy()
    ref = np.stack(
        [[cv2.resize(m, (40, 32), interpolation=cv2.INTER_LINEAR) for m in row] for row in src]
    )
    np.testing.assert_allclose(out.double().numpy(), _np_minmax(ref), atol=1e-5, rtol=0)
    flat = out.flatten(2)
    assert torch.all(flat.amin(-1) == 0) and torch.all(flat.amax(-1) == 1)


def test_heatmaps_same_size_still_normalised():
    cams = torch.rand(1, 2, 8, 8) * 3
    out = P.heatmaps(cams, (8, 8))
    np.testing.assert_allclose(out.numpy(), _np_minmax(cams.numpy()), atol=1e-6)


def test_heatmaps_leave_their_input_alone_and_keep_gradients():
    """heatmaps normalises its own upsampled copy in place: never the caller's maps (same size:
    no copy is made), never a tensor autograd needs (float64 finite differences agree)."""
    cams = torch.rand(2, 3, 8, 8) * 3
    kept = cams.clone()
    for size in ((8, 8), (16, 12)):
        out = P.heatmaps(cams, size)
        assert torch.equal(cams, kept) and out.amax() == 1
    half = cams.half()
    P.normalize(half)  # computed in a float32 copy, which is normalised in place
    assert torch.equal(half, kept.half())
    leaf = torch.rand(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: P.heatmaps(x, (7, 5)), (leaf,))


def _pil_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference: PIL's antialiased BILINEAR resize of each (H, W) plane in float32 ('F')."""
    from PIL import Image

    height, width = size
    planes = [
        np.asarray(Image.fromarray(plane.astype(np.float32), "F").resize((width, height),
                                                                          Image.Resampling.BILINEAR))
        for plane in images.reshape(-1, *images.shape[-2:])
    ]  # fmt: skip
    return np.stack(planes).reshape(*images.shape[:-2], height, width)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((480, 640), (384, 512)), ((1280, 2560), (256, 512)), ((600, 700), (439, 512)),
     ((3, 1100), (1, 512))],
)  # fmt: skip
def test_shrink_is_pil_bilinear(shape, size):
    """uint8 images within one level of PIL's float filter, floats within float rounding; the
    longest side becomes 512, the other keeps the aspect ratio (rounded, at least 1)."""
    rng = np.random.default_rng(shape[0])
    pixels = rng.integers(0, 256, (2, 3, *shape), dtype=np.uint8)
    reference = _pil_bilinear(pixels, size)
    planar = torch.from_numpy(pixels)
    for pictures in (planar, planar.contiguous(memory_format=torch.channels_last)):
        small = P.shrink(pictures, 512)
        assert small.shape == (2, 3, *size) and small.dtype == torch.uint8
        assert small.is_contiguous(memory_format=torch.channels_last) == (pictures is not planar)
        assert np.abs(small.numpy().astype(np.float64) - reference).max() <= 1.0
    floats = P.shrink(planar.double(), 512).numpy()
    np.testing.assert_allclose(floats, reference, atol=2e-3)
    rounded = P._shrink_in_float(planar, size)  # what uint8 images get off the CPU
    assert rounded.dtype == torch.uint8
    assert np.abs(rounded.numpy().astype(np.float64) - reference).max() <= 0.5 + 5e-3


def test_shrink_keeps_small_images_and_checks_its_inputs():
    images = torch.zeros(1, 3, 384, 512, dtype=torch.uint8)
    assert P.shrink(images, 512) is images
    assert P.shrink(images, 128).shape == (1, 3, 96, 128)
    for bad, match in [(images[0], r"\(N, C, H, W\)"), (images.int(), "uint8 or floating")]:
        with pytest.raises(ValueError, match=match):
            P.shrink(bad, 512)
    with pytest.raises(ValueError, match="longest must be >= 1"):
        P.shrink(images, 0)
    runner, names = doctest.DocTestRunner(), {"shrink": P.shrink, "torch": torch}
    for example in doctest.DocTestFinder().find(P.shrink, globs=names):
        runner.run(example)
    assert tuple(runner.summarize(verbose=False)) == (0, 1)  # (failed, attempted)


# colour maps -------------------------------------------------------------------------------------


def test_jet_matches_opencv():
    lut = P.colormap_lut("jet")
    assert lut.dtype == torch.uint8 and lut.shape == (256, 3)
    diff = np.abs(lut.numpy().astype(np.int64) - _cv2_jet_rgb())
    assert diff.max() <= 1
    assert (diff.max(1) == 0).sum() >= 255  # all but OpenCV's one float32 rounding quirk


@pytest.mark.parametrize("name", ["turbo", "viridis", "inferno", "magma", "plasma"])
def test_matplotlib_colormaps(name):
    lut = P.colormap_lut(name)
    assert lut.dtype == torch.uint8 and lut.shape == (256, 3)
    assert np.abs(lut.numpy().astype(np.int64) - _mpl_lut(name)).max() <= 1


def test_gray_and_listing():
    gray = P.colormap_lut("gray")
    assert torch.equal(gray, torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3))
    names = P.available_colormaps()
    assert {"jet", "turbo", "viridis", "gray", "inferno"} <= set(names)
    assert names == sorted(names)


def test_colormap_lut_cached_and_case_insensitive():
    assert P.colormap_lut("jet") is P.colormap_lut("jet", "cpu")
    assert torch.equal(P.colormap_lut("JET"), P.colormap_lut("jet"))


def test_unknown_colormap():
    with pytest.raises(ValueError, match="jet") as info:
        P.colormap_lut("nope")
    assert "viridis" in str(info.value) and "nope" in str(info.value)
    with pytest.raises(ValueError, match="jet"):
        P.colorize(torch.rand(1, 1, 2, 2), "nope")


# colorize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_colorize_matches_opencv(dtype):
    heat = torch.rand(2, 3, 5, 6, dtype=torch.float64).to(dtype)
    out = P.colorize(heat, "jet")
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 3, 5, 6) and out.is_contiguous()
    levels = np.clip(np.round(heat.double().numpy() * 255), 0, 255).astype(np.uint8)
    for b in range(2):
        for k in range(3):
            ref = cv2.applyColorMap(levels[b, k], cv2.COLORMAP_JET)[..., ::-1]  # (H, W, 3) RGB
            got = out[b, k].permute(1, 2, 0).numpy().astype(np.int64)
            assert np.abs(got - ref.astype(np.int64)).max() <= 1


def test_colorize_clamps_and_nan():
    heat = torch.tensor([[[[-0.5, 0.0, float("nan")], [1.0, 2.0, float("inf")]]]])
    out = P.colorize(heat, "gray")[0, 0, 0]
    assert out.tolist() == [[0, 0, 0], [255, 255, 255]]


def test_colorize_rounds_to_nearest_level():
    heat = torch.tensor([[[[10.4 / 255, 10.6 / 255]]]], dtype=torch.float64)
    assert P.colorize(heat, "gray")[0, 0, 0].tolist() == [[10, 11]]


def test_colorize_rejects_integer():
    with pytest.raises(ValueError, match="floating"):
        P.colorize(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))


# overlay -----------------------------------------------------------------------------------------


def _np_overlay(images, heat, lut, alpha):
    """Reference: one image and class at a time, in float64."""
    b_, k_ = heat.shape[:2]
    out = np.zeros((b_, k_, 3, *heat.shape[2:]), dtype=np.uint8)
    for b in range(b_):
        img = images[b].transpose(1, 2, 0).astype(np.float64)  # (H, W, 3)
        for k in range(k_):
            levels = np.clip(np.round(heat[b, k].astype(np.float64) * 255), 0, 255).astype(int)
            colour = lut[levels].astype(np.float64)  # (H, W, 3)
            blend = np.clip(np.round(alpha * colour + (1 - alpha) * img), 0, 255)
            out[b, k] = blend.astype(np.uint8).transpose(2, 0, 1)
    return out


def _inputs(b=2, k=3, h=9, w=11, seed=0):
    rng = _rng(seed)
    images = rng.integers(0, 256, (b, 3, h, w), dtype=np.uint8)
    heat = rng.random((b, k, h, w)).astype(np.float32)
    return images, heat


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.3, 1.0])
def test_overlay_matches_numpy_loop_with_opencv_jet(alpha):
    images, heat = _inputs()
    out = P.overlay(torch.from_numpy(images), torch.from_numpy(heat), "jet", alpha)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 3, 9, 11)
    ref = _np_overlay(images, heat, _cv2_jet_rgb(), alpha)
    assert np.abs(out.numpy().astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["viridis", "turbo"])
def test_overlay_matches_numpy_loop_with_matplotlib(name):
    images, heat = _inputs(seed=3)
    out = P.overlay(torch.from_numpy(images), torch.from_numpy(heat), name, 0.4)
    ref = _np_overlay(images, heat, _mpl_lut(name), 0.4)
    assert np.abs(out.numpy().astype(int) - ref.astype(int)).max() <= 1


def test_overlay_keeps_the_images_memory_format():
    """Channels-last images (decoders give (3, H, W) views of (H, W, 3) pixels) give channels-last
    overlays, the rows of an RGB picture, with the same bytes as contiguous images give."""
    images, heat = _inputs(seed=11)
    last = torch.from_numpy(images.transpose(0, 2, 3, 1).copy()).permute(0, 3, 1, 2)
    out = P.overlay(last, torch.from_numpy(heat), "turbo", 0.5)
    assert out.permute(0, 1, 3, 4, 2).is_contiguous()
    reference = _np_overlay(images, heat, P.colormap_lut("turbo").numpy(), 0.5)
    np.testing.assert_array_equal(out.numpy(), reference)
    planar = P.overlay(torch.from_numpy(images), torch.from_numpy(heat), "turbo", 0.5)
    assert planar.is_contiguous() and torch.equal(planar, out)


def test_overlay_blend_exact_at_half():
    images, heat = _inputs(seed=5)
    out = P.overlay(torch.from_numpy(images), torch.from_numpy(heat), "turbo", 0.5)
    ref = _np_overlay(images, heat, P.colormap_lut("turbo").numpy(), 0.5)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_overlay_alpha_extremes():
    images, heat = _inputs()
    img_t, heat_t = torch.from_numpy(images), torch.from_numpy(heat)
    assert torch.equal(
        P.overlay(img_t, heat_t, alpha=0.0), img_t[:, None].expand(-1, 3, -1, -1, -1)
    )
    assert torch.equal(P.overlay(img_t, heat_t, alpha=1.0), P.colorize(heat_t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_overlay_float_images_and_heatmaps(dtype):
    images, heat = _inputs(seed=7)
    heat_t = torch.from_numpy(heat).to(dtype)
    ref = P.overlay(torch.from_numpy(images), heat_t.double())
    float_images = (torch.from_numpy(images).double() / 255).to(dtype)  # k / 255 -> k again
    out = P.overlay(float_images, heat_t)
    assert out.dtype == torch.uint8
    assert torch.equal(out, ref)


def test_overlay_three_dim_heatmaps():
    images, heat = _inputs(k=1)
    img_t = torch.from_numpy(images)
    out = P.overlay(img_t, torch.from_numpy(heat[:, 0]), "viridis")
    assert out.shape == (2, 1, 3, 9, 11)
    assert torch.equal(out, P.overlay(img_t, torch.from_numpy(heat), "viridis"))


def test_overlay_errors():
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    heat = torch.rand(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        P.overlay(img[0], heat)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        P.overlay(img[:, :1], heat)
    with pytest.raises(ValueError, match="uint8 or floating"):
        P.overlay(img.int(), heat)
    with pytest.raises(ValueError, match="batch"):
        P.overlay(img, heat[:1])
    with pytest.raises(ValueError, match="does not resize"):
        P.overlay(img, torch.rand(2, 4, 7, 7))
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            P.overlay(img, heat, alpha=alpha)
    with pytest.raises(ValueError, match="floating"):
        P.overlay(img, (heat * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        P.overlay(img, heat[None])


# devices and purity ------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images, heat = _inputs()
    cams = torch.rand(2, 3, 7, 7)
    h_cpu = P.heatmaps(cams, (9, 11))
    h_gpu = P.heatmaps(cams.cuda(), (9, 11))
    assert h_gpu.is_cuda
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, atol=1e-5, rtol=0)
    out = P.overlay(torch.from_numpy(images).cuda(), torch.from_numpy(heat).cuda(), "turbo", 0.5)
    assert out.is_cuda
    assert torch.equal(
        out.cpu(), P.overlay(torch.from_numpy(images), torch.from_numpy(heat), "turbo", 0.5)
    )
    assert P.colormap_lut("jet", "cuda").device.index is not None
    tiny = P.normalize(torch.rand(2, 2, 5, 5, device="cuda") * 1e-13).flatten(2)
    assert torch.all(tiny.amin(-1) == 0) and torch.all(tiny.amax(-1) == 1)
    photos = torch.randint(0, 256, (2, 3, 480, 640), dtype=torch.uint8)
    tiles = P.shrink(photos.cuda(), 512)  # no uint8 kernel on CUDA: filtered in float32
    assert tiles.is_cuda and tiles.dtype == torch.uint8 and tiles.shape == (2, 3, 384, 512)
    assert (tiles.cpu().int() - P.shrink(photos, 512).int()).abs().max() <= 1


def test_module_imports_no_other_cam_engine_module():
    tree = ast.parse(inspect.getsource(P))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("cam_engine")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("cam_engine") for a in node.names)


# overlay: the integer blend ----------------------------------------------------------------------


def _every_level_on_every_base():
    """(1, 3, 256, 256) images whose column x is level x in every channel, and (1, 1, 256, 256)
    heatmaps whose row y is at level y: every (colour level, image level) pair once."""
    images = torch.arange(256, dtype=torch.uint8).expand(1, 3, 256, 256).contiguous()
    heat = (torch.arange(256, dtype=torch.float64) / 255).view(1, 1, 256, 1).expand(1, 1, 256, 256)
    return images, heat.float()


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.7, 0.1, 0.9, 1 / 3])
def test_overlay_is_the_float64_formula_on_every_pair(alpha):
    images, heat = _every_level_on_every_base()
    out = P.overlay(images, heat, "jet", alpha)
    colour = P.colormap_lut("jet").numpy().astype(np.float64)  # (256 levels, 3)
    base = np.arange(256, dtype=np.float64)
    # round(alpha * colour + (1 - alpha) * image), in float64, for level y, image level x
    want = np.round(alpha * colour.T[:, :, None] + (1 - alpha) * base[None, None, :])
    np.testing.assert_array_equal(out[0, 0].numpy(), want.astype(np.uint8))


def test_overlay_hand_computed_pixels():
    # jet level 0 is (0, 0, 128): 382.5 - |0 - 255| = 127.5 rounds to even, 128; level 255 is
    # (128, 0, 0)
    images = torch.tensor([[10, 200], [20, 100], [31, 0]], dtype=torch.uint8).view(1, 3, 1, 2)
    heat = torch.tensor([[[[0.0, 1.0]]]])
    half = P.overlay(images, heat, "jet", 0.5)[0, 0, :, 0, :]
    # (0 + 10) / 2 = 5, (0 + 20) / 2 = 10, (128 + 31) / 2 = 79.5 -> 80 (half to even);
    # (128 + 200) / 2 = 164, 100 / 2 = 50, 0
    assert half.tolist() == [[5, 164], [10, 50], [80, 0]]
    quarter = P.overlay(images, heat, "jet", 0.25)[0, 0, :, 0, 1]
    assert quarter.tolist() == [182, 75, 0]  # 0.25 * 128 + 0.75 * 200 = 182, 0.75 * 100 = 75


def test_overlay_makes_no_float_copy_of_the_overlays():
    """The blend is integer work: no floating-point tensor as large as the overlays (B, K, 3,
    H, W) is made, only the levels of the heatmaps (B, K, H, W)."""
    images, heat = _inputs(b=2, k=2, h=16, w=20)
    img_t, heat_t = torch.from_numpy(images), torch.from_numpy(heat)
    big = 2 * 2 * 3 * 16 * 20
    P.overlay(img_t, heat_t, "viridis", 0.4)  # builds the blend table once (3 * 65536 values)
    with _Made() as made:
        P.overlay(img_t, heat_t, "viridis", 0.4)
    assert made.float_sizes and max(made.float_sizes) < big


class _Made(TorchDispatchMode):
    """The sizes of the floating-point tensors made by the operations run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.float_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.float_sizes.append(t.numel())
        return out
