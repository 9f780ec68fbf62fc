// File edges of cam-ort: binary PPM (P6) / PGM (P5) images and NumPy .npy arrays.
#pragma once

#include <cctype>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cam_ort {

// An 8-bit RGB picture, interleaved rows: pixel (y, x) channel c at (y * width + x) * 3 + c.
struct Image {
    int width = 0, height = 0;
    std::vector<uint8_t> rgb;
};

inline std::ifstream open_input(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    return in;
}

namespace detail {
// A PNM header token, skipping whitespace and '#' comments.
inline std::string pnm_token(std::istream& in) {
    std::string token;
    for (int c = in.get(); c != EOF; c = in.get()) {
        if (c == '#') {
            while (c != EOF && c != '\n') c = in.get();
        } else if (std::isspace(c)) {
            if (!token.empty()) return token;
        } else {
            token += static_cast<char>(c);
        }
    }
    return token;
}

inline int pnm_int(std::istream& in, const std::string& path, const char* what) {
    std::string token = pnm_token(in);
    try {
        size_t used = 0;
        int value = std::stoi(token, &used);
        if (used == token.size() && value > 0) return value;
    } catch (const std::exception&) {
    }
    throw std::runtime_error(path + ": bad PPM/PGM " + what + " '" + token + "'");
}
}  // namespace detail

// Reads a binary PPM (RGB) or PGM (grey, copied to the three channels); 16-bit files are
// scaled to 8 bits. Other formats raise with the reason.
inline Image read_pnm(const std::string& path) {
    std::ifstream in = open_input(path);
    std::string magic = detail::pnm_token(in);
    if (magic != "P6" && magic != "P5") {
        std::string shown = magic.substr(0, 2);
        for (char& c : shown) c = std::isprint(static_cast<unsigned char>(c)) ? c : '?';
        throw std::runtime_error(path + ": not a binary PPM (P6) or PGM (P5) image (starts '" +
                                 shown + "')");
    }
    Image image;
    image.width = detail::pnm_int(in, path, "width");
    image.height = detail::pnm_int(in, path, "height");
    int maxval = detail::pnm_int(in, path, "maximum value");
    if (maxval > 65535) throw std::runtime_error(path + ": maximum value above 65535");
    const size_t channels = magic == "P6" ? 3 : 1;
    const size_t bytes = maxval > 255 ? 2 : 1;
    const size_t count = static_cast<size_t>(image.width) * image.height * channels;
    std::vector<uint8_t> raw(count * bytes);
    in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    if (static_cast<size_t>(in.gcount()) != raw.size())
        throw std::runtime_error(path + ": truncated image data");
    image.rgb.resize(static_cast<size_t>(image.width) * image.height * 3);
    for (size_t i = 0; i < count; ++i) {
        unsigned value = bytes == 2 ? (raw[2 * i] << 8 | raw[2 * i + 1]) : raw[i];
        auto level = static_cast<uint8_t>((value * 255u + maxval / 2) / maxval);
        if (channels == 3) {
            image.rgb[i] = level;
        } else {
            for (size_t c = 0; c < 3; ++c) image.rgb[3 * i + c] = level;
        }
    }
    return image;
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

// Reads a little-endian float32 .npy (format 1.0-3.0, C order).
inline Array read_npy(const std::string& path) {
    std::ifstream in = open_input(path);
    char magic[8];
    in.read(magic, 8);
    if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        throw std::runtime_error(path + ": not a .npy file");
    uint32_t length = 0;
    if (magic[6] == 1) {
        uint8_t b[2];
        in.read(reinterpret_cast<char*>(b), 2);
        length = b[0] | b[1] << 8;
    } else {
        uint8_t b[4];
        in.read(reinterpret_cast<char*>(b), 4);
        length = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint32_t>(b[3]) << 24;
    }
    std::string header(length, '\0');
    in.read(header.data(), length);
    header.erase(header.find_last_not_of(" \n") + 1);
    auto field = [&](const std::string& key) {
        size_t at = header.find("'" + key + "'");
        if (at == std::string::npos) throw std::runtime_error(path + ": npy header lacks " + key);
        return header.substr(header.find(':', at) + 1);
    };
    std::string descr = field("descr");
    if (descr.find("'<f4'") != descr.find_first_not_of(' '))
        throw std::runtime_error(path + ": expected a float32 array ('<f4'), header: " + header);
    if (field("fortran_order").find("False") != field("fortran_order").find_first_not_of(' '))
        throw std::runtime_error(path + ": Fortran-order arrays are not supported");
    std::string dims = field("shape");
    dims = dims.substr(dims.find('(') + 1, dims.find(')') - dims.find('(') - 1);
    Array array;
    std::stringstream list(dims);
    size_t count = 1;
    for (std::string item; std::getline(list, item, ',');) {
        if (item.find_first_not_of(' ') == std::string::npos) continue;
        array.shape.push_back(std::stoll(item));
        count *= static_cast<size_t>(array.shape.back());
    }
    array.data.resize(count);
    in.read(reinterpret_cast<char*>(array.data.data()),
            static_cast<std::streamsize>(count * sizeof(float)));
    if (static_cast<size_t>(in.gcount()) != count * sizeof(float))
        throw std::runtime_error(path + ": truncated array data");
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
