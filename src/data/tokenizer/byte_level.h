// GPT-2 byte-level alphabet (HF ByteLevel pre-tokenizer/decoder) and the UTF-8 helpers around it.
//
// Byte-level BPE never sees raw bytes: every byte b is shown to the model as one printable code point
// bytes_char(b) (printable Latin-1 bytes map to themselves, the rest to U+0100 onwards). We run BPE on raw
// bytes instead and translate the vocabulary once at load, so the per-text work skips the mapping.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dsv3::tok {

// The code point that stands for byte b (HF `bytes_char()`).
char32_t byte_to_char(uint8_t b);
// The byte a code point stands for, if it is one of the 256 alphabet characters.
std::optional<uint8_t> char_to_byte(char32_t c);

// Appends the UTF-8 encoding of c.
void append_utf8(std::string& out, char32_t c);
// Decodes the code point at s[i] (valid UTF-8 assumed) and advances i past it.
char32_t next_utf8(std::string_view s, size_t& i);
// Rust's char::is_whitespace (the White_Space property), used by added-token lstrip/rstrip and Strip.
bool is_whitespace(char32_t c);

// Translates a vocabulary token written in the byte-level alphabet back to the bytes it stands for;
// nullopt when some character is outside the alphabet (e.g. an added token such as "<|endoftext|>" with '|'
// inside is fine, but "｜" is not).
std::optional<std::string> byte_level_to_bytes(std::string_view token);
// The token as the byte-level alphabet writes these bytes (inverse of byte_level_to_bytes).
std::string bytes_to_byte_level(std::string_view bytes);

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

}  // namespace dsv3::tok
