// cam-ort: run a model written by cam_engine.export.to_onnx with ONNX Runtime's C++ API and
// write its heatmaps (.npy) and colour overlays (.ppm) at each image's size, with no Python at run
// time.
//
//   cam-ort MODEL.onnx INPUT... [--out DIR] [--provider cpu|cuda|tensorrt] [--bench N] ...
//
// INPUT: PNG, JPEG, binary PPM/PGM images (resized and normalised as the model's metadata says) or
// float32 .npy model inputs, (C, H, W) or (B, C, H, W), taken as they are. See kUsage.

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <set>

#include "imaging.hpp"
#include "io.hpp"
#include "json.hpp"

namespace fs = std::filesystem;
using namespace cam_ort;

namespace {

const char* kUsage = R"(usage: cam-ort MODEL.onnx INPUT... [options]

Runs a model exported by cam_engine.export.to_onnx and writes, per image, into --out:
  <name>.heatmaps.npy   float32 (K, H, W) heatmaps in [0, 1] (files with a heatmaps output) at
                        the image's own size (.npy inputs: the input's), or --model-size
  <name>.<class>.ppm    colour overlay of each explained class, the same size
  predictions.tsv       a header line, then one row per map: image, class, probability (softmax
                        of the logits), logit
INPUT: PNG, JPEG, binary PPM (P6) / PGM (P5) images (the format told by the first bytes), resized
  whole to the model's input size and normalised with its mean/std (metadata); or float32 .npy
  model inputs (C, H, W) / (B, C, H, W), used as given. A malformed input, or an option out of
  range, stops the run (exit code 2) with the reason.

options:
  --out DIR             output folder (default cam_ort_out)
  --provider NAME       cpu (default), cuda or tensorrt (TensorRT falls back to CUDA, then CPU)
  --device N            GPU index for cuda / tensorrt, 0..1023 (default 0)
  --batch N             images per run, 1..4096 (default: all at once; the model's batch if fixed)
  --size HxW            input size for models exported with dynamic_size, sides 1..16384
                        (default: metadata's)
  --classes C1,C2,...   classes to explain, for models exported with classes_input=True
  --threads N           ONNX Runtime intra-op threads, 1..1024 (default: ORT's choice)
  --colormap NAME       overlay colours: jet (default) or gray
  --model-size          maps and overlays as the model outputs them (its input size, or the
                        target map's for files exported with upsample=False), not resized
  --no-overlay          write no .ppm overlays
  --save-input          also write <name>.input.npy: the preprocessed model input (C, H, W)
  --bench N             time N (1..1000000) more runs of the first batch: latency percentiles,
                        images/s
  --warmup N            untimed runs before --bench, 0..1000000 (default 3)
  --trt-cache DIR       TensorRT engine cache folder
)";

struct Options {
    std::string model, out = "cam_ort_out", provider = "cpu", colormap = "jet", trt_cache;
    std::vector<std::string> inputs;
    std::vector<int64_t> classes;
    int device = 0, batch = 0, threads = 0, bench = 0, warmup = 3, height = 0, width = 0;
    bool overlays = true, save_input = false, model_size = false;
};

// The integer `text` of an option, digits only (no sign, no spaces), in [min, max].
int to_int(const std::string& text, const std::string& option, int min, int max) {
    uint64_t value = 0;
    if (!parse_decimal(text, static_cast<uint64_t>(max), value) ||
        value < static_cast<uint64_t>(min))
        throw std::runtime_error(option + " expects an integer in " + std::to_string(min) + ".." +
                                 std::to_string(max) + ", got '" + shown(text) + "'");
    return static_cast<int>(value);
}

// Bounds of the numeric options: beyond them a value is a typo, not a request.
constexpr int kMaxBatch = 4096, kMaxDevice = 1023, kMaxThreads = 1024, kMaxRuns = 1000000,
              kMaxSide = 16384;

Options parse_options(int argc, char** argv) {
    Options o;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw std::runtime_error(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") {
            std::cout << kUsage;
            std::exit(0);
        } else if (arg == "--out") {
            o.out = value();
        } else if (arg == "--provider") {
            o.provider = value();
        } else if (arg == "--device") {
            o.device = to_int(value(), arg, 0, kMaxDevice);
        } else if (arg == "--batch") {
            o.batch = to_int(value(), arg, 1, kMaxBatch);
        } else if (arg == "--threads") {
            o.threads = to_int(value(), arg, 1, kMaxThreads);
        } else if (arg == "--bench") {
            o.bench = to_int(value(), arg, 1, kMaxRuns);
        } else if (arg == "--warmup") {
            o.warmup = to_int(value(), arg, 0, kMaxRuns);
        } else if (arg == "--colormap") {
            o.colormap = value();
        } else if (arg == "--trt-cache") {
            o.trt_cache = value();
        } else if (arg == "--no-overlay") {
            o.overlays = false;
        } else if (arg == "--save-input") {
            o.save_input = true;
        } else if (arg == "--model-size") {
            o.model_size = true;
        } else if (arg == "--size") {
            const std::string size = value();
            const size_t x = size.find('x');
            uint64_t height = 0, width = 0;
            if (x == std::string::npos ||
                !parse_decimal(size.substr(0, x), kMaxSide, height) ||
                !parse_decimal(size.substr(x + 1), kMaxSide, width) || !height || !width)
                throw std::runtime_error("--size expects HxW with sides in 1.." +
                                         std::to_string(kMaxSide) + ", got '" +
                                         shown(size) + "'");
            o.height = static_cast<int>(height);
            o.width = static_cast<int>(width);
        } else if (arg == "--classes") {
            const std::string list = value();
            for (size_t start = 0, end = 0; end != std::string::npos; start = end + 1) {
                end = list.find(',', start);
                uint64_t c = 0;
                if (!parse_decimal(list.substr(start, end - start),
                                           std::numeric_limits<int>::max(), c))
                    throw std::runtime_error("--classes expects class indices 0,1,..., got '" +
                                             shown(list) + "'");
                o.classes.push_back(static_cast<int64_t>(c));
            }
        } else if (arg.rfind("--", 0) == 0) {
            throw std::runtime_error("unknown option " + arg + " (see --help)");
        } else {
            positional.push_back(arg);
        }
    }
    if (positional.size() < 2) throw std::runtime_error("need a model and at least one input\n" +
                                                        std::string(kUsage));
    o.model = positional[0];
    o.inputs.assign(positional.begin() + 1, positional.end());
    if (o.provider != "cpu" && o.provider != "cuda" && o.provider != "tensorrt")
        throw std::runtime_error("unknown provider '" + o.provider +
                                 "'; available: cpu, cuda, tensorrt");
    colormap(o.colormap);  // unknown names fail before any work
    return o;
}

// What to_onnx stored under the "cam_engine" metadata key, as the runner needs it.
struct Model {
    int channels = 3, height = 0, width = 0, fixed_batch = 0, topk = 1;  // fixed_batch 0: dynamic
    int64_t num_classes = 0;
    bool dynamic_size = false, takes_classes = false, normalize = true;
    std::array<float, 3> mean{}, std{};
    float alpha = 0.5f;
    std::vector<std::string> outputs;
};

Model read_metadata(const Json& meta) {
    Model m;
    const Json& x = meta.at("inputs").at("x");
    if (x.array.size() != 4) throw std::runtime_error("metadata: input x is not (B, C, H, W)");
    if (x.array[0].type == Json::Type::Number) m.fixed_batch = static_cast<int>(x.array[0].integer());
    m.channels = static_cast<int>(x.array[1].integer());
    m.height = static_cast<int>(meta.at("input_size").array.at(0).integer());
    m.width = static_cast<int>(meta.at("input_size").array.at(1).integer());
    m.dynamic_size = meta.at("dynamic_size").boolean;
    m.normalize = meta.at("normalize").boolean;
    m.takes_classes = meta.at("inputs").has("classes");
    m.topk = static_cast<int>(meta.at("topk").integer());
    m.num_classes = meta.at("num_classes").integer();
    m.alpha = static_cast<float>(meta.at("alpha").number);
    for (int c = 0; c < 3; ++c) {
        m.mean[c] = static_cast<float>(meta.at("mean").array.at(c).number);
        m.std[c] = static_cast<float>(meta.at("std").array.at(c).number);
    }
    return m;
}

void append_provider(Ort::SessionOptions& options, const Options& o) {
    if (o.provider == "cpu") return;
    const std::string wanted =
        o.provider == "cuda" ? "CUDAExecutionProvider" : "TensorrtExecutionProvider";
    const std::vector<std::string> available = Ort::GetAvailableProviders();
    if (std::find(available.begin(), available.end(), wanted) == available.end()) {
        std::string names;
        for (const auto& name : available) names += (names.empty() ? "" : ", ") + name;
        throw std::runtime_error("provider " + o.provider + " (" + wanted +
                                 ") is not available in this ONNX Runtime build; available: " +
                                 names);
    }
    const OrtApi& api = Ort::GetApi();
    const std::string device = std::to_string(o.device);
    try {
        if (o.provider == "tensorrt") {
            OrtTensorRTProviderOptionsV2* trt = nullptr;
            Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
            std::vector<const char*> keys{"device_id"}, values{device.c_str()};
            if (!o.trt_cache.empty()) {
                keys.insert(keys.end(), {"trt_engine_cache_enable", "trt_engine_cache_path"});
                values.insert(values.end(), {"1", o.trt_cache.c_str()});
            }
            Ort::Status status(api.UpdateTensorRTProviderOptions(trt, keys.data(), values.data(),
                                                                 keys.size()));
            if (status.IsOK()) options.AppendExecutionProvider_TensorRT_V2(*trt);
            api.ReleaseTensorRTProviderOptions(trt);
            if (!status.IsOK()) throw Ort::Exception(status.GetErrorMessage(), status.GetErrorCode());
        }
        // CUDA also under TensorRT: it takes the nodes TensorRT refuses
        OrtCUDAProviderOptionsV2* cuda = nullptr;
        Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
        const char* key = "device_id";
        const char* value = device.c_str();
        Ort::Status status(api.UpdateCUDAProviderOptions(cuda, &key, &value, 1));
        if (status.IsOK()) options.AppendExecutionProvider_CUDA_V2(*cuda);
        api.ReleaseCUDAProviderOptions(cuda);
        if (!status.IsOK()) throw Ort::Exception(status.GetErrorMessage(), status.GetErrorCode());
    } catch (const Ort::Exception& e) {
        throw std::runtime_error("cannot start provider " + o.provider + ": " + e.what() +
                                 " (are the CUDA / cuDNN / TensorRT libraries on "
                                 "LD_LIBRARY_PATH?)");
    }
}

// One model input (C, H, W), the image file it was made from (empty for .npy inputs) and the name
// its outputs are written under.
struct Sample {
    std::string name;
    Planar x;
    std::string picture;
};

std::string unique_name(const std::string& name, std::set<std::string>& taken) {
    std::string unique = name;  // a.ppm and b/a.ppm: a, a~2
    for (int n = 2; taken.count(unique); ++n) unique = name + "~" + std::to_string(n);
    taken.insert(unique);
    return unique;
}

std::vector<Sample> load_inputs(const Options& o, const Model& m) {
    const int height = o.height ? o.height : m.height, width = o.width ? o.width : m.width;
    std::vector<Sample> samples;
    std::set<std::string> taken;
    for (const std::string& path : o.inputs) {
        if (!fs::is_regular_file(path)) throw std::runtime_error("no such file: " + path);
        const std::string stem = fs::path(path).stem().string();
        if (fs::path(path).extension() != ".npy") {
            if (m.channels != 3)
                throw std::runtime_error("the model takes " + std::to_string(m.channels) +
                                         " channels; images give 3 (pass .npy inputs)");
            samples.push_back({unique_name(stem, taken),
                               preprocess(read_image(path), height, width, m.mean, m.std), path});
            continue;
        }
        Array a = read_npy(path);
        const std::string given = shape_text(a.shape);
        if (a.shape.size() == 3) a.shape.insert(a.shape.begin(), 1);
        const auto side = [](int64_t d) { return d >= 1 && d <= std::numeric_limits<int>::max(); };
        if (a.shape.size() != 4 || a.shape[1] != m.channels ||
            !std::all_of(a.shape.begin(), a.shape.end(), side))
            throw std::runtime_error(path + ": expected a float32 (B, " +
                                     std::to_string(m.channels) + ", H, W) or (" +
                                     std::to_string(m.channels) +
                                     ", H, W) array with no empty dimension, got shape " + given);
        const size_t size = static_cast<size_t>(a.shape[1] * a.shape[2] * a.shape[3]);
        for (int64_t b = 0; b < a.shape[0]; ++b) {
            Planar x{static_cast<int>(a.shape[1]), static_cast<int>(a.shape[2]),
                     static_cast<int>(a.shape[3]),
                     std::vector<float>(a.data.begin() + b * size, a.data.begin() + (b + 1) * size)};
            const std::string name = a.shape[0] == 1 ? stem : stem + "_" + std::to_string(b);
            samples.push_back({unique_name(name, taken), std::move(x), {}});
        }
    }
    for (const Sample& s : samples) {
        const bool fits = m.dynamic_size ? s.x.height == samples[0].x.height &&
                                               s.x.width == samples[0].x.width
                                         : s.x.height == m.height && s.x.width == m.width;
        if (!fits)
            throw std::runtime_error(
                s.name + ": input is " + std::to_string(s.x.height) + "x" +
                std::to_string(s.x.width) + " but the model takes " +
                (m.dynamic_size ? "one size per run (the first input's " +
                                      std::to_string(samples[0].x.height) + "x" +
                                      std::to_string(samples[0].x.width) + ")"
                                : std::to_string(m.height) + "x" + std::to_string(m.width) +
                                      " (exported without dynamic_size)"));
    }
    return samples;
}

// One run's outputs, copied out of ORT's buffers.
struct Outputs {
    std::map<std::string, std::vector<int64_t>> shapes;
    std::map<std::string, Ort::Value> values;
};

class Runner {
public:
    Runner(Ort::Session& session, const Model& model, const std::vector<int64_t>& classes)
        : session_(session), model_(model), classes_(classes) {
        Ort::AllocatorWithDefaultOptions allocator;
        for (size_t i = 0; i < session.GetOutputCount(); ++i)
            output_names_.push_back(session.GetOutputNameAllocated(i, allocator).get());
        for (const auto& name : output_names_) output_ptrs_.push_back(name.c_str());
    }

    const std::vector<std::string>& output_names() const { return output_names_; }

    // Runs (B, C, H, W) `x`: the file's outputs by name.
    std::map<std::string, Ort::Value> run(std::vector<float>& x, const std::vector<int64_t>& shape) {
        const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        std::vector<Ort::Value> inputs;
        std::vector<const char*> names{"x"};
        inputs.push_back(Ort::Value::CreateTensor<float>(memory, x.data(), x.size(),
                                                         shape.data(), shape.size()));
        std::vector<int64_t> classes;
        const std::vector<int64_t> classes_shape{shape[0], static_cast<int64_t>(classes_.size())};
        if (model_.takes_classes) {
            for (int64_t b = 0; b < shape[0]; ++b)
                classes.insert(classes.end(), classes_.begin(), classes_.end());
            inputs.push_back(Ort::Value::CreateTensor<int64_t>(
                memory, classes.data(), classes.size(), classes_shape.data(), 2));
            names.push_back("classes");
        }
        auto values = session_.Run(Ort::RunOptions{nullptr}, names.data(), inputs.data(),
                                   inputs.size(), output_ptrs_.data(), output_ptrs_.size());
        std::map<std::string, Ort::Value> out;
        for (size_t i = 0; i < values.size(); ++i) out.emplace(output_names_[i], std::move(values[i]));
        if (model_.takes_classes) {  // the file does not output its own input
            Ort::AllocatorWithDefaultOptions allocator;
            auto given = Ort::Value::CreateTensor<int64_t>(allocator, classes_shape.data(), 2);
            std::copy(classes.begin(), classes.end(), given.GetTensorMutableData<int64_t>());
            out.emplace("classes", std::move(given));
        }
        return out;
    }

private:
    Ort::Session& session_;
    const Model& model_;
    std::vector<int64_t> classes_;
    std::vector<std::string> output_names_;
    std::vector<const char*> output_ptrs_;
};

std::vector<int64_t> shape_of(const Ort::Value& value) {
    return value.GetTensorTypeAndShapeInfo().GetShape();
}

// Softmax of `n` logits, in double precision.
std::vector<double> softmax(const float* logits, int64_t n) {
    const double top = *std::max_element(logits, logits + n);
    std::vector<double> p(logits, logits + n);
    for (double& v : p) v = std::exp(v - top);
    const double total = std::accumulate(p.begin(), p.end(), 0.0);
    for (double& v : p) v /= total;
    return p;
}

// Writes the outputs of samples [first, first + count) of a batch.
void write_results(const Options& o, const Model& m, const std::vector<Sample>& samples,
                   size_t first, size_t count, std::map<std::string, Ort::Value>& out,
                   std::ofstream& table) {
    const auto lut = colormap(o.colormap);
    const int64_t n = shape_of(out.at("logits"))[1];
    const float* logits = out.at("logits").GetTensorData<float>();
    const int64_t* classes = out.at("classes").GetTensorData<int64_t>();
    const int64_t k = shape_of(out.at("classes"))[1];
    for (size_t b = 0; b < count; ++b) {
        const Sample& s = samples[first + b];
        const std::string base = (fs::path(o.out) / s.name).string();
        const std::vector<double> p = softmax(logits + b * n, n);
        for (int64_t j = 0; j < k; ++j) {
            const int64_t c = classes[b * k + j];
            table << s.name << '\t' << c << '\t' << p[c] << '\t' << logits[b * n + c] << '\n';
        }
        if (o.save_input)
            write_npy(base + ".input.npy", s.x.data.data(), {s.x.channels, s.x.height, s.x.width});
        if (out.count("overlay")) {  // exported with a colour map: the file drew them
            const auto shape = shape_of(out.at("overlay"));  // (B, K, 3, H, W) uint8
            const size_t plane = static_cast<size_t>(shape[3] * shape[4]);
            const uint8_t* data = out.at("overlay").GetTensorData<uint8_t>();
            for (int64_t j = 0; o.overlays && j < k; ++j) {
                Image picture{static_cast<int>(shape[4]), static_cast<int>(shape[3]),
                              std::vector<uint8_t>(3 * plane)};
                const uint8_t* map = data + (b * k + j) * 3 * plane;
                for (size_t p = 0; p < plane; ++p)
                    for (size_t c = 0; c < 3; ++c) picture.rgb[3 * p + c] = map[c * plane + p];
                write_ppm(base + "." + std::to_string(classes[b * k + j]) + ".ppm", picture);
            }
            continue;
        }
        // the picture the maps are drawn over: the image, decoded again (only one original is in
        // memory at a time), else the model input's
        const Image picture = !o.model_size && !s.picture.empty() ? read_image(s.picture)
                                                                  : picture_of(s.x, m.mean, m.std);
        const auto shape = shape_of(out.at("heatmaps"));  // (B, K, h, w)
        const int h = static_cast<int>(shape[2]), w = static_cast<int>(shape[3]);
        const float* maps = out.at("heatmaps").GetTensorData<float>() + b * k * h * w;
        std::vector<float> resized;
        int height = h, width = w;
        if (!o.model_size && (h != picture.height || w != picture.width)) {
            height = picture.height;
            width = picture.width;
            resized = resize_maps(maps, k, h, w, height, width, m.normalize);
            maps = resized.data();
        }
        write_npy(base + ".heatmaps.npy", maps, {k, height, width});
        // maps at the feature map's size (upsample=False) have no picture of their size
        if (!o.overlays || height != picture.height || width != picture.width) continue;
        for (int64_t j = 0; j < k; ++j)
            write_ppm(base + "." + std::to_string(classes[b * k + j]) + ".ppm",
                      overlay(maps + j * height * width, picture, lut, m.alpha));
    }
}

// A batch of samples [first, first + count) as one (B, C, H, W) buffer, padded with copies of
// the last sample up to `batch` (models exported with a fixed batch size).
std::vector<float> stack(const std::vector<Sample>& samples, size_t first, size_t count,
                         size_t batch, std::vector<int64_t>& shape) {
    const Planar& x0 = samples[first].x;
    shape = {static_cast<int64_t>(batch), x0.channels, x0.height, x0.width};
    std::vector<float> data;
    data.reserve(batch * x0.data.size());
    for (size_t b = 0; b < batch; ++b) {
        const auto& x = samples[first + std::min(b, count - 1)].x.data;
        data.insert(data.end(), x.begin(), x.end());
    }
    return data;
}

void bench(Runner& runner, std::vector<float>& x, const std::vector<int64_t>& shape,
           const Options& o) {
    for (int i = 0; i < o.warmup; ++i) runner.run(x, shape);
    std::vector<double> ms;
    for (int i = 0; i < o.bench; ++i) {
        const auto start = std::chrono::steady_clock::now();
        runner.run(x, shape);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                                start).count());
    }
    std::sort(ms.begin(), ms.end());
    auto pct = [&](double q) {  // nearest rank
        return ms[std::min(ms.size() - 1, static_cast<size_t>(std::ceil(q * ms.size())) - 1)];
    };
    const double mean = std::accumulate(ms.begin(), ms.end(), 0.0) / ms.size();
    std::cout << std::fixed << std::setprecision(3) << "bench: provider " << o.provider
              << ", batch " << shape[0] << "x" << shape[1] << "x" << shape[2] << "x" << shape[3]
              << ", " << ms.size() << " runs (" << o.warmup << " warm-up): p50 " << pct(0.5)
              << " ms, p90 " << pct(0.9) << " ms, p99 " << pct(0.99) << " ms, mean " << mean
              << " ms, min " << ms.front() << " ms; " << std::setprecision(1)
              << 1000.0 * shape[0] / mean << " images/s\n";
}

int run(const Options& o) {
    if (!fs::is_regular_file(o.model)) throw std::runtime_error("no such model file: " + o.model);
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "cam-ort");
    Ort::SessionOptions options;
    if (o.threads) options.SetIntraOpNumThreads(o.threads);
    append_provider(options, o);
    Ort::Session session(env, o.model.c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;
    auto meta = session.GetModelMetadata().LookupCustomMetadataMapAllocated("cam_engine", allocator);
    if (!meta)
        throw std::runtime_error(o.model + " has no 'cam_engine' metadata: export it with "
                                 "cam_engine.export.to_onnx");
    const Model m = read_metadata(parse_json(meta.get()));
    if (m.takes_classes == o.classes.empty())
        throw std::runtime_error(m.takes_classes ? "this model explains given classes: pass "
                                                   "--classes C1,C2,..."
                                                 : "this model explains its top-" +
                                                       std::to_string(m.topk) +
                                                       " classes; --classes needs a model "
                                                       "exported with classes_input=True");
    for (int64_t c : o.classes)
        if (c >= m.num_classes)
            throw std::runtime_error("--classes: class " + std::to_string(c) +
                                     " is out of range for a model with " +
                                     std::to_string(m.num_classes) + " classes (0.." +
                                     std::to_string(m.num_classes - 1) + ")");
    if ((o.height || o.width) && !m.dynamic_size)
        throw std::runtime_error("--size needs a model exported with dynamic_size=True; this one "
                                 "takes " + std::to_string(m.height) + "x" +
                                 std::to_string(m.width));
    const std::vector<Sample> samples = load_inputs(o, m);
    size_t batch = m.fixed_batch ? m.fixed_batch : (o.batch ? o.batch : samples.size());
    if (m.fixed_batch && o.batch && o.batch != m.fixed_batch)
        throw std::runtime_error("the model was exported with a fixed batch size of " +
                                 std::to_string(m.fixed_batch) + "; --batch " +
                                 std::to_string(o.batch) + " cannot run");

    fs::create_directories(o.out);
    std::ofstream table(fs::path(o.out) / "predictions.tsv");
    table << std::setprecision(9) << "image\tclass\tprobability\tlogit\n";
    Runner runner(session, m, o.classes);
    std::vector<int64_t> shape;
    auto batch_at = [&](size_t first) {
        const size_t count = std::min(batch, samples.size() - first);
        return stack(samples, first, count, m.fixed_batch ? batch : count, shape);
    };
    for (size_t first = 0; first < samples.size(); first += batch) {
        std::vector<float> x = batch_at(first);
        auto out = runner.run(x, shape);
        write_results(o, m, samples, first, std::min(batch, samples.size() - first), out, table);
    }
    std::cout << "cam-ort: " << samples.size() << " input(s), outputs in " << o.out << "\n";
    if (o.bench > 0) {
        std::vector<float> x = batch_at(0);
        bench(runner, x, shape, o);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse_options(argc, argv));
    } catch (const Ort::Exception& e) {
        std::cerr << "cam-ort: error: ONNX Runtime: " << e.what() << "\n";
    } catch (const std::exception& e) {
        std::cerr << "cam-ort: error: " << e.what() << "\n";
    }
    return 2;
}
