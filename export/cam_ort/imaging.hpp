// Preprocessing (resize, normalise) and colour overlays, as the Python side computes them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "io.hpp"

namespace cam_ort {

// A planar float picture (C, H, W).
struct Planar {
    int channels = 0, height = 0, width = 0;
    std::vector<float> data;
};

namespace detail {
// Weights of antialiased bilinear resampling along one axis, as torch's
// interpolate(mode="bilinear", antialias=True, align_corners=False) and PIL compute them: a
// triangle filter widened by the scale when shrinking, so every input pixel contributes.
struct Taps {
    std::vector<int> first, count;
    std::vector<double> weights;  // count[i] weights per output, at offsets[i]
    std::vector<size_t> offsets;
};

inline Taps taps(int in, int out) {
    Taps t;
    const double scale = static_cast<double>(in) / out;
    const double support = scale >= 1.0 ? scale : 1.0;
    const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    for (int i = 0; i < out; ++i) {
        const double center = scale * (i + 0.5);
        const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
        const int hi = std::min(static_cast<int>(center + support + 0.5), in);
        t.first.push_back(lo);
        t.count.push_back(hi - lo);
        t.offsets.push_back(t.weights.size());
        double total = 0.0;
        for (int j = lo; j < hi; ++j) {
            double w = std::max(0.0, 1.0 - std::abs((j - center + 0.5) * invscale));
            t.weights.push_back(w);
            total += w;
        }
        for (int j = 0; j < hi - lo; ++j) t.weights[t.offsets.back() + j] /= total;
    }
    return t;
}
}  // namespace detail

// Resizes each channel of `src` to (height, width): antialiased bilinear, half-pixel centres.
inline Planar resize(const Planar& src, int height, int width) {
    if (src.height == height && src.width == width) return src;
    const detail::Taps tx = detail::taps(src.width, width), ty = detail::taps(src.height, height);
    Planar mid{src.channels, src.height, width, {}};
    mid.data.resize(static_cast<size_t>(src.channels) * src.height * width);
    for (int c = 0; c < src.channels; ++c)
        for (int y = 0; y < src.height; ++y) {
            const float* row = &src.data[(static_cast<size_t>(c) * src.height + y) * src.width];
            float* dst = &mid.data[(static_cast<size_t>(c) * src.height + y) * width];
            for (int x = 0; x < width; ++x) {
                double sum = 0.0;
                for (int j = 0; j < tx.count[x]; ++j)
                    sum += tx.weights[tx.offsets[x] + j] * row[tx.first[x] + j];
                dst[x] = static_cast<float>(sum);
            }
        }
    Planar out{src.channels, height, width, {}};
    out.data.resize(static_cast<size_t>(src.channels) * height * width);
    for (int c = 0; c < src.channels; ++c)
        for (int y = 0; y < height; ++y) {
            float* dst = &out.data[(static_cast<size_t>(c) * height + y) * width];
            for (int j = 0; j < ty.count[y]; ++j) {
                const double w = ty.weights[ty.offsets[y] + j];
                const float* row =
                    &mid.data[(static_cast<size_t>(c) * src.height + ty.first[y] + j) * width];
                for (int x = 0; x < width; ++x) dst[x] += static_cast<float>(w * row[x]);
            }
        }
    return out;
}

// An 8-bit picture as the model's input (3, height, width): values / 255, resized, then
// (x - mean) / std per channel (torchvision's Normalize).
inline Planar preprocess(const Image& image, int height, int width,
                         const std::array<float, 3>& mean, const std::array<float, 3>& std) {
    Planar planar{3, image.height, image.width, {}};
    const size_t pixels = static_cast<size_t>(image.height) * image.width;
    planar.data.resize(3 * pixels);
    for (size_t p = 0; p < pixels; ++p)
        for (size_t c = 0; c < 3; ++c) planar.data[c * pixels + p] = image.rgb[3 * p + c] / 255.0f;
    Planar out = resize(planar, height, width);
    const size_t plane = static_cast<size_t>(height) * width;
    for (size_t c = 0; c < 3; ++c)
        for (size_t p = 0; p < plane; ++p)
            out.data[c * plane + p] = (out.data[c * plane + p] - mean[c]) / std[c];
    return out;
}

// The 256-entry RGB table of a colour map: "jet" (OpenCV's COLORMAP_JET as RGB, the formula of
// cam_engine.postprocess) or "gray".
inline std::vector<std::array<uint8_t, 3>> colormap(const std::string& name) {
    std::vector<std::array<uint8_t, 3>> lut(256);
    if (name != "jet" && name != "gray")
        throw std::runtime_error("unknown colour map '" + name + "'; available: gray, jet");
    for (int j = 0; j < 256; ++j) {
        const double centres[3] = {765.0, 510.0, 255.0};
        for (int c = 0; c < 3; ++c) {
            const double v = name == "gray" ? j
                                            : std::clamp(382.5 - std::abs(4.0 * j - centres[c]),
                                                         0.0, 255.0);
            lut[j][c] = static_cast<uint8_t>(std::nearbyint(v));  // halves to even, as torch
        }
    }
    return lut;
}

// The 8-bit picture of a model input x (3, H, W): round(clamp(x * std + mean, 0, 1) * 255).
inline Image picture_of(const Planar& x, const std::array<float, 3>& mean,
                        const std::array<float, 3>& std) {
    Image out{x.width, x.height, std::vector<uint8_t>(static_cast<size_t>(x.width) * x.height * 3)};
    const size_t plane = static_cast<size_t>(x.height) * x.width;
    for (size_t p = 0; p < plane; ++p)
        for (size_t c = 0; c < 3; ++c)
            out.rgb[3 * p + c] = static_cast<uint8_t>(
                std::nearbyint(std::clamp(x.data[c * plane + p] * std[c] + mean[c], 0.0f, 1.0f) *
                               255.0f));
    return out;
}

// One heatmap in [0, 1] at the picture's size blended over it:
// round(alpha * colour + (1 - alpha) * picture), as cam_engine.overlay.
inline Image overlay(const float* heatmap, const Image& picture,
                     const std::vector<std::array<uint8_t, 3>>& lut, float alpha) {
    Image out{picture.width, picture.height, std::vector<uint8_t>(picture.rgb.size())};
    const size_t plane = static_cast<size_t>(picture.height) * picture.width;
    for (size_t p = 0; p < plane; ++p) {
        const float h = heatmap[p];
        const int level = std::isnan(h) ? 0 : static_cast<int>(std::clamp(
                                                   std::nearbyint(255.0f * h), 0.0f, 255.0f));
        for (size_t c = 0; c < 3; ++c) {
            const float blend = lut[level][c] * alpha + picture.rgb[3 * p + c] * (1.0f - alpha);
            out.rgb[3 * p + c] = static_cast<uint8_t>(std::clamp(std::nearbyint(blend), 0.0f, 255.0f));
        }
    }
    return out;
}

// K maps (K, h, w) resized to (height, width) as cam_engine.postprocess.heatmaps does: bilinear
// with half-pixel centres (torch's interpolate, align_corners=False, no antialiasing), then, when
// `normalize`, each map min-max normalised, a flat map (range within 16 float32 epsilons of its
// magnitude) all zeros. Min-max after a resize equals min-max of the resized raw maps.
inline std::vector<float> resize_maps(const float* maps, int64_t k, int h, int w, int height,
                                      int width, bool normalize) {
    struct Tap {
        int lo, hi;
        double weight;  // of hi
    };
    const auto taps = [](int in, int out) {
        std::vector<Tap> t(out);
        const double scale = static_cast<double>(in) / out;
        for (int i = 0; i < out; ++i) {
            const double source = std::max(scale * (i + 0.5) - 0.5, 0.0);
            const int lo = std::min(static_cast<int>(source), in - 1);
            t[i] = {lo, std::min(lo + 1, in - 1), source - lo};
        }
        return t;
    };
    const std::vector<Tap> ty = taps(h, height), tx = taps(w, width);
    const size_t plane = static_cast<size_t>(height) * width;
    std::vector<float> out(static_cast<size_t>(k) * plane);
    for (int64_t j = 0; j < k; ++j) {
        const float* map = maps + j * static_cast<size_t>(h) * w;
        float* dst = out.data() + j * plane;
        for (int y = 0; y < height; ++y) {
            const float* top = map + static_cast<size_t>(ty[y].lo) * w;
            const float* bottom = map + static_cast<size_t>(ty[y].hi) * w;
            for (int x = 0; x < width; ++x) {
                const Tap& t = tx[x];
                const double upper = top[t.lo] + t.weight * (top[t.hi] - top[t.lo]);
                const double lower = bottom[t.lo] + t.weight * (bottom[t.hi] - bottom[t.lo]);
                dst[static_cast<size_t>(y) * width + x] =
                    static_cast<float>(upper + ty[y].weight * (lower - upper));
            }
        }
        if (!normalize) continue;
        const auto [low, high] = std::minmax_element(dst, dst + plane);
        const float min = *low, range = *high - *low;
        const float flat = 16 * std::numeric_limits<float>::epsilon() *
                           std::max(std::abs(*low), std::abs(*high));
        for (size_t p = 0; p < plane; ++p) dst[p] = range <= flat ? 0.0f : (dst[p] - min) / range;
    }
    return out;
}

}  // namespace cam_ort
