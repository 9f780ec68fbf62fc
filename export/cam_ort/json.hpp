// A minimal JSON reader for the "cam_engine" metadata that to_onnx writes (objects, arrays,
// numbers, strings, true/false/null). Not a general library: no \u escapes beyond ASCII.
#pragma once

#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cam_ort {

struct Json {
    enum class Type { Null, Bool, Number, String, Array, Object } type = Type::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;
    std::vector<Json> array;
    std::map<std::string, Json> object;

    bool has(const std::string& key) const { return object.count(key) > 0; }
    const Json& at(const std::string& key) const {
        auto it = object.find(key);
        if (it == object.end()) throw std::runtime_error("metadata has no '" + key + "' entry");
        return it->second;
    }
    bool is_null() const { return type == Type::Null; }
    long long integer() const { return static_cast<long long>(number); }
};

class JsonParser {
public:
    explicit JsonParser(const std::string& text) : s_(text) {}

    Json parse() {
        Json value = parse_value();
        skip_space();
        if (i_ != s_.size()) fail("trailing characters");
        return value;
    }

private:
    const std::string& s_;
    size_t i_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error("bad metadata JSON at character " + std::to_string(i_) + ": " +
                                 what);
    }
    void skip_space() {
        while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    char peek() {
        skip_space();
        if (i_ >= s_.size()) fail("unexpected end");
        return s_[i_];
    }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++i_;
    }
    bool literal(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (s_.compare(i_, n, word) != 0) return false;
        i_ += n;
        return true;
    }

    Json parse_value() {
        Json v;
        char c = peek();
        if (c == '{') {
            v.type = Json::Type::Object;
            ++i_;
            if (peek() == '}') return ++i_, v;
            for (;;) {
                std::string key = parse_string();
                expect(':');
                v.object[key] = parse_value();
                if (peek() == ',') { ++i_; continue; }
                expect('}');
                return v;
            }
        }
        if (c == '[') {
            v.type = Json::Type::Array;
            ++i_;
            if (peek() == ']') return ++i_, v;
            for (;;) {
                v.array.push_back(parse_value());
                if (peek() == ',') { ++i_; continue; }
                expect(']');
                return v;
            }
        }
        if (c == '"') {
            v.type = Json::Type::String;
            v.string = parse_string();
            return v;
        }
        if (literal("true")) { v.type = Json::Type::Bool; v.boolean = true; return v; }
        if (literal("false")) { v.type = Json::Type::Bool; return v; }
        if (literal("null")) return v;
        const char* start = s_.c_str() + i_;
        char* end = nullptr;
        v.number = std::strtod(start, &end);
        if (end == start) fail("unexpected character");
        v.type = Json::Type::Number;
        i_ += static_cast<size_t>(end - start);
        return v;
    }

    std::string parse_string() {
        expect('"');
        std::string out;
        while (i_ < s_.size() && s_[i_] != '"') {
            char c = s_[i_++];
            if (c == '\\' && i_ < s_.size()) {
                char e = s_[i_++];
                switch (e) {
                    case 'n': out += '\n'; break;
                    case 't': out += '\t'; break;
                    case 'u': out += '?'; i_ += 4; break;  // names here are ASCII
                    default: out += e;
                }
            } else {
                out += c;
            }
        }
        if (i_ >= s_.size()) fail("unterminated string");
        ++i_;
        return out;
    }
};

inline Json parse_json(const std::string& text) { return JsonParser(text).parse(); }

}  // namespace cam_ort
