// stb_image's implementation, compiled once: the PNG and JPEG decoders only (a smaller surface
// for untrusted files), reading from memory (io.hpp checks the file first).
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_NO_STDIO
#include <stb_image.h>
