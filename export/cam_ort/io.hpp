// File edges of cam-ort: PNG and JPEG (stb_image), binary PPM (P6) / PGM (P5) images and NumPy
// .npy arrays.
#pragma once

#include <cctype>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <stb_image.h>  // compiled once, for PNG and JPEG only, in stb_image.cpp

namespace cam_ort {

// An 8-bit RGB picture, interleaved rows: pixel (y, x) channel c at (y * width + x) * 3 + c.
struct Image {
    int width = 0, height = 0;
    std::vector<uint8_t> rgb;
};

// `text` cut to `limit` characters, non-printable ones as '?', to quote in a one-line error.
inline std::string shown(const std::string& text, size_t limit = 32) {
    std::string out = text.substr(0, limit);
    for (char& c : out) c = std::isprint(static_cast<unsigned char>(c)) ? c : '?';
    return text.size() > limit ? out + "..." : out;
}

// The value of a run of decimal digits (no sign, no spaces), or false when it is not one or
// exceeds `max`.
inline bool parse_decimal(const std::string& text, uint64_t max, uint64_t& value) {
    if (text.empty()) return false;
    value = 0;
    for (char c : text) {
        if (c < '0' || c > '9') return false;
        if (__builtin_mul_overflow(value, 10u, &value) ||
            __builtin_add_overflow(value, static_cast<uint64_t>(c - '0'), &value))
            return false;
    }
    return value <= max;
}

namespace detail {
// An input file and its size: every header field is checked against the bytes the file holds
// before anything is allocated from it, and every failure names the file.
class Input {
public:
    explicit Input(const std::string& path) : path_(path), in_(path, std::ios::binary) {
        std::error_code error;
        size_ = std::filesystem::file_size(path, error);
        if (!in_ || error) throw std::runtime_error("cannot open " + path);
    }

    uint64_t size() const { return size_; }
    uint64_t left() const { return size_ - position_; }

    // The next byte, or EOF.
    int get() {
        const int c = in_.get();
        if (c != EOF) ++position_;
        return c;
    }

    // Reads `count` bytes; fails naming `what` when the file holds fewer.
    void read(void* to, uint64_t count, const std::string& what) {
        if (count > left()) fail("the file ends inside its " + what);
        in_.read(static_cast<char*>(to), static_cast<std::streamsize>(count));
        if (static_cast<uint64_t>(in_.gcount()) != count)
            fail("cannot read its " + what + " (the file shrank?)");
        position_ += count;
    }

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error(path_ + ": " + what);
    }

private:
    std::string path_;
    std::ifstream in_;
    uint64_t size_ = 0, position_ = 0;
};

// A PNM header number: skips whitespace and '#' comments (to the end of the line), reads the
// token and the one whitespace character (or comment) that ends it, as netpbm does.
inline uint64_t pnm_number(Input& in, const char* what, uint64_t max) {
    std::string token;
    for (int c = in.get();; c = in.get()) {
        if (c == EOF) {
            if (token.empty()) in.fail(std::string("the file ends before its ") + what);
            break;
        }
        if (c == '#') {
            while (c != EOF && c != '\n' && c != '\r') c = in.get();
            if (!token.empty()) break;
        } else if (std::isspace(c)) {
            if (!token.empty()) break;
        } else if (token.size() <= 32) {  // longer is no number: keep what the error shows
            token += static_cast<char>(c);
        }
    }
    uint64_t value = 0;
    if (token.find_first_not_of("0123456789") != std::string::npos)
        in.fail(std::string("bad ") + what + " '" + shown(token) + "'");
    if (!parse_decimal(token, max, value) || value == 0)
        in.fail(std::string(what) + " " + shown(token) + " is out of range 1.." +
                std::to_string(max));
    return value;
}
}  // namespace detail

// Reads a binary PPM (RGB) or PGM (grey, copied to the three channels); 16-bit (big-endian)
// files are scaled to 8 bits. Other formats, and headers the file's size cannot back, raise
// with the reason.
inline Image read_pnm(const std::string& path) {
    detail::Input in(path);
    std::string magic;
    for (int i = 0; i < 2 && in.left() > 0; ++i) magic += static_cast<char>(in.get());
    if (magic != "P6" && magic != "P5")
        in.fail("not a PNG, JPEG, binary PPM (P6) or PGM (P5) image (starts '" + shown(magic) +
                "')");
    const int after = in.get();
    if (after != '#' && !std::isspace(after))
        in.fail("no whitespace after the magic number '" + magic + "'");
    if (after == '#')
        for (int c = after; c != EOF && c != '\n' && c != '\r';) c = in.get();
    const uint64_t int_max = std::numeric_limits<int>::max();
    const uint64_t width = detail::pnm_number(in, "width", int_max);
    const uint64_t height = detail::pnm_number(in, "height", int_max);
    const uint64_t maxval = detail::pnm_number(in, "maximum value", 65535);
    const uint64_t channels = magic == "P6" ? 3 : 1, bytes = maxval > 255 ? 2 : 1;
    const std::string what = "a " + std::to_string(width) + "x" + std::to_string(height) + " " +
                             magic + " image with maximum value " + std::to_string(maxval);
    uint64_t count = 0, need = 0;  // width * height < 2^62 cannot overflow
    if (__builtin_mul_overflow(width * height, channels, &count) ||
        __builtin_mul_overflow(count, bytes, &need))
        in.fail(what + " is too large (its byte count overflows 64 bits)");
    if (need > in.left())
        in.fail(what + " needs " + std::to_string(need) + " bytes of pixels, the file has " +
                std::to_string(in.left()));
    std::vector<uint8_t> raw(need);
    in.read(raw.data(), need, "pixels");
    Image image{static_cast<int>(width), static_cast<int>(height),
                std::vector<uint8_t>(width * height * 3)};
    for (uint64_t i = 0; i < count; ++i) {
        const unsigned value = bytes == 2 ? (raw[2 * i] << 8 | raw[2 * i + 1]) : raw[i];
        if (value > maxval)
            in.fail("sample value " + std::to_string(value) + " is above the maximum value " +
                    std::to_string(maxval));
        const auto level = static_cast<uint8_t>((value * 255u + maxval / 2) / maxval);
        if (channels == 3) {
            image.rgb[i] = level;
        } else {
            for (size_t c = 0; c < 3; ++c) image.rgb[3 * i + c] = level;
        }
    }
    return image;
}

// The most pixels a PNG or JPEG may declare to be decoded: explain's --max-pixels default (PIL's
// MAX_IMAGE_PIXELS), checked on the header before the decoder allocates anything.
constexpr uint64_t kMaxPixels = 89478485;

// Decodes a PNG or JPEG file with stb_image as 8-bit RGB: grey copied to the three channels,
// alpha dropped, 16-bit samples cut to 8 bits.
inline Image read_png_jpeg(const std::string& path) {
    detail::Input in(path);
    if (in.size() > static_cast<uint64_t>(std::numeric_limits<int>::max()))
        in.fail("the file is over 2 GiB, more than the PNG / JPEG decoder takes");
    std::vector<uint8_t> bytes(in.size());
    in.read(bytes.data(), bytes.size(), "data");
    const int size = static_cast<int>(bytes.size());
    int width = 0, height = 0, channels = 0;
    if (!stbi_info_from_memory(bytes.data(), size, &width, &height, &channels))
        in.fail(std::string("cannot read the image header (") + stbi_failure_reason() + ")");
    if (static_cast<uint64_t>(width) * static_cast<uint64_t>(height) > kMaxPixels)
        in.fail("a " + std::to_string(width) + "x" + std::to_string(height) +
                " image is over the " + std::to_string(kMaxPixels) + " pixels decoded");
    const std::unique_ptr<stbi_uc, void (*)(void*)> pixels(
        stbi_load_from_memory(bytes.data(), size, &width, &height, &channels, 3), stbi_image_free);
    if (!pixels) in.fail(std::string("cannot decode the image (") + stbi_failure_reason() + ")");
    return Image{width, height,
                 std::vector<uint8_t>(pixels.get(), pixels.get() + size_t{3} * width * height)};
}

// Reads a picture as 8-bit RGB, its format told by its first bytes: PNG, JPEG, else PPM / PGM.
inline Image read_image(const std::string& path) {
    std::string head;
    {
        detail::Input in(path);
        for (int i = 0; i < 8 && in.left() > 0; ++i) head += static_cast<char>(in.get());
    }
    if (head.rfind("\x89PNG\r\n\x1a\n", 0) == 0 || head.rfind("\xff\xd8\xff", 0) == 0)
        return read_png_jpeg(path);
    return read_pnm(path);
}

inline void write_ppm(const std::string& path, const Image& image) {
    std::ofstream out(path, std::ios::binary);
    out << "P6\n" << image.width << " " << image.height << "\n255\n";
    out.write(reinterpret_cast<const char*>(image.rgb.data()),
              static_cast<std::streamsize>(image.rgb.size()));
    if (!out) throw std::runtime_error("cannot write " + path);
}

// A C-order float32 array.
struct Array {
    std::vector<int64_t> shape;
    std::vector<float> data;
};

namespace detail {
// The dictionary of a .npy header, a Python literal such as
// {'descr': '<f4', 'fortran_order': False, 'shape': (3, 64, 64), }: exactly these three keys.
struct NpyHeader {
    std::string descr;
    bool fortran_order = false;
    std::vector<int64_t> shape;
};

class NpyHeaderParser {
public:
    NpyHeaderParser(const std::string& text, const Input& in) : s_(text), in_(in) {}

    NpyHeader parse() {
        NpyHeader h;
        std::set<std::string> seen;
        expect('{');
        while (peek() != '}') {
            const std::string key = string();
            if (!seen.insert(key).second) fail("key '" + shown(key) + "' given twice");
            expect(':');
            if (key == "descr") {
                h.descr = string();
            } else if (key == "fortran_order") {
                h.fortran_order = boolean();
            } else if (key == "shape") {
                h.shape = shape();
            } else {
                fail("unknown key '" + shown(key) + "'");
            }
            if (peek() != ',') break;
            ++i_;
        }
        expect('}');
        if (i_ != s_.size()) fail("text after the dictionary at character " + std::to_string(i_));
        for (const char* key : {"descr", "fortran_order", "shape"})
            if (!seen.count(key)) fail(std::string("no '") + key + "' entry");
        return h;
    }

private:
    const std::string& s_;
    const Input& in_;
    size_t i_ = 0;

    [[noreturn]] void fail(const std::string& what) const { in_.fail("bad .npy header: " + what); }
    char peek() {
        while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
        return i_ < s_.size() ? s_[i_] : '\0';
    }
    void expect(char c) {
        if (peek() != c) {
            const std::string wanted = c == '}' ? "',' or '}'" : std::string("'") + c + "'";
            fail("expected " + wanted + " at character " + std::to_string(i_));
        }
        ++i_;
    }
    // A quoted string, 'x' or "x" (numpy writes repr()s: no escapes in these values).
    std::string string() {
        const char quote = peek();
        if (quote != '\'' && quote != '"') fail("expected a quoted string at character " +
                                                std::to_string(i_));
        const size_t end = s_.find(quote, i_ + 1);
        if (end == std::string::npos) fail("unterminated string at character " +
                                           std::to_string(i_));
        std::string value = s_.substr(i_ + 1, end - i_ - 1);
        i_ = end + 1;
        return value;
    }
    bool boolean() {
        peek();
        for (const bool value : {true, false}) {
            const std::string word = value ? "True" : "False";
            if (s_.compare(i_, word.size(), word) == 0) {
                i_ += word.size();
                return value;
            }
        }
        fail("fortran_order is not True or False");
    }
    // A tuple of non-negative integers: (), (3,), (3, 64, 64).
    std::vector<int64_t> shape() {
        std::vector<int64_t> dims;
        expect('(');
        while (peek() != ')') {
            const size_t end = s_.find_first_of(",)", i_);
            std::string item = s_.substr(i_, end == std::string::npos ? end : end - i_);
            item.erase(item.find_last_not_of(" \t\n\r") + 1);
            uint64_t value = 0;
            if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos)
                fail("shape entries must be non-negative integers, got '" + shown(item) + "'");
            if (!parse_decimal(item, std::numeric_limits<int64_t>::max(), value))
                fail("shape entry " + shown(item) + " is too large");
            if (dims.size() == 64) fail("more than 64 dimensions");  // numpy's own limit
            dims.push_back(static_cast<int64_t>(value));
            i_ += item.size();
            if (peek() != ',') break;
            ++i_;
        }
        if (peek() != ')') fail("expected ',' or ')' at character " + std::to_string(i_));
        ++i_;
        return dims;
    }
};
}  // namespace detail

// A shape as numpy prints it: (3, 64, 64), (3,), ().
inline std::string shape_text(const std::vector<int64_t>& shape) {
    std::string text = "(";
    for (size_t i = 0; i < shape.size(); ++i)
        text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + (shape.size() == 1 ? ",)" : ")");
}

// Reads a little-endian float32 .npy (format 1.0-3.0, C order). The header is checked field by
// field, and its shape against the bytes that follow it, before the data is allocated.
inline Array read_npy(const std::string& path) {
    detail::Input in(path);
    uint8_t prefix[8];
    in.read(prefix, 8, ".npy magic");
    if (std::memcmp(prefix, "\x93NUMPY", 6) != 0)
        in.fail("not a .npy file (no \\x93NUMPY magic)");
    if (prefix[6] < 1 || prefix[6] > 3 || prefix[7] != 0)
        in.fail("unsupported .npy format version " + std::to_string(prefix[6]) + "." +
                std::to_string(prefix[7]) + " (1.0, 2.0 and 3.0 are read)");
    uint8_t b[4] = {0, 0, 0, 0};
    in.read(b, prefix[6] == 1 ? 2 : 4, ".npy header length");
    const uint32_t length = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint32_t>(b[3]) << 24;
    if (length > in.left())
        in.fail("header length " + std::to_string(length) + " runs past the end of the file (" +
                std::to_string(in.size()) + " bytes)");
    std::string text(length, '\0');
    in.read(text.data(), length, ".npy header");
    text.erase(text.find_last_not_of(" \t\n\r") + 1);  // numpy pads with spaces and a newline
    const detail::NpyHeader header = detail::NpyHeaderParser(text, in).parse();
    if (header.descr != "<f4")
        in.fail("expected a float32 array ('<f4'), got '" + shown(header.descr) + "'");
    if (header.fortran_order) in.fail("Fortran-order arrays are not supported");
    uint64_t count = 1, bytes = 0;
    bool overflow = false;
    for (int64_t d : header.shape)
        overflow |= __builtin_mul_overflow(count, static_cast<uint64_t>(d), &count);
    if (overflow || __builtin_mul_overflow(count, sizeof(float), &bytes))
        in.fail("shape " + shape_text(header.shape) +
                " is too large (its byte count overflows 64 bits)");
    // exactly: np.save writes no more, and a header that disagrees with its data is corrupt
    if (bytes != in.left())
        in.fail("shape " + shape_text(header.shape) + " needs " + std::to_string(bytes) +
                " bytes of float32 data, the file has " + std::to_string(in.left()));
    Array array{header.shape, std::vector<float>(count)};
    in.read(array.data.data(), bytes, "array data");
    return array;
}

// Writes a .npy (format 1.0) of float32 ("<f4") or int64 ("<i8") values.
template <typename T>
void write_npy(const std::string& path, const T* data, const std::vector<int64_t>& shape) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float32 or int64");
    std::string dims;
    size_t count = 1;
    for (int64_t d : shape) {
        dims += std::to_string(d) + ", ";
        count *= static_cast<size_t>(d);
    }
    if (shape.size() > 1) dims.resize(dims.size() - 1);
    std::string header = std::string("{'descr': '") + (sizeof(T) == 4 ? "<f4" : "<i8") +
                         "', 'fortran_order': False, 'shape': (" + dims + "), }";
    header.append(63 - (10 + header.size()) % 64, ' ');  // data starts at a multiple of 64
    header += '\n';
    std::ofstream out(path, std::ios::binary);
    const auto length = static_cast<uint16_t>(header.size());
    out.write("\x93NUMPY\x01\x00", 8);
    out.put(static_cast<char>(length & 0xff)).put(static_cast<char>(length >> 8));
    out << header;
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(T)));
    if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace cam_ort
