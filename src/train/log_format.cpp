// Megatron-LM's stdout formats (see log_format.h). printf's %f/%E are correctly rounded like Python's
// float formatting; only nan/inf spelling differs (glibc prints "-nan"), handled here.
#include "train/log_format.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>

#include "core/error.h"

namespace dsv3 {

namespace {

std::string vformat(const char* fmt, int precision, double v) {
  const int n = std::snprintf(nullptr, 0, fmt, precision, v);
  std::string s(static_cast<size_t>(n), '\0');
  std::snprintf(s.data(), s.size() + 1, fmt, precision, v);
  return s;
}

std::string nonfinite(double v, bool upper) {
  if (std::isnan(v)) return upper ? "NAN" : "nan";  // Python never prints a sign on nan
  return std::string(v < 0 ? "-" : "") + (upper ? "INF" : "inf");
}

// Python's '{:Nd}'.
std::string fmt_d(int64_t v, int width) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%*lld", width, static_cast<long long>(v));
  return buf;
}

// Python's len(): code points, i.e. UTF-8 lead bytes.
size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

std::string python_format_f(double v, int precision) {
  if (!std::isfinite(v)) return nonfinite(v, false);
  return vformat("%.*f", precision, v);
}

std::string python_format_e(double v, int precision) {
  if (!std::isfinite(v)) return nonfinite(v, true);
  return vformat("%.*E", precision, v);
}

std::string python_float_str(double v) {
  if (!std::isfinite(v)) return nonfinite(v, false);
  // Shortest round-trip digits (what Python's repr uses), read back as sign, digits and decimal exponent.
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // "-d.ddde+XX"
  const size_t epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  const int exp10 = std::stoi(sci.substr(epos + 1));
  std::string sign;
  if (!mant.empty() && mant[0] == '-') {
    sign = "-";
    mant.erase(0, 1);
  }
  std::string digits;
  for (char c : mant)
    if (c != '.') digits.push_back(c);
  const int n = static_cast<int>(digits.size());
  const int decpt = exp10 + 1;  // value = 0.DIGITS * 10^decpt
  std::string out;
  if (decpt <= -4 || decpt > 16) {  // Python's 'r' switch to exponent notation
    out = digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof(e), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += e;
  } else if (decpt <= 0) {
    out = "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
  } else if (decpt < n) {
    out = digits.substr(0, static_cast<size_t>(decpt)) + "." + digits.substr(static_cast<size_t>(decpt));
  } else {
    out = digits + std::string(static_cast<size_t>(decpt - n), '0') + ".0";
  }
  return sign + out;
}

std::string format_iteration_line(const IterationLogFields& f) {
  std::string s = " [" + f.timestamp + "]";
  s += " iteration " + fmt_d(f.iteration, 8) + "/" + fmt_d(f.train_iters, 8) + " |";
  s += " actual seqlen: " + fmt_d(f.seq_length, 5) + " |";
  s += " consumed samples: " + fmt_d(f.consumed_samples, 12) + " |";
  if (f.skipped_samples > 0) s += " skipped samples: " + fmt_d(f.skipped_samples, 12) + " |";
  s += " elapsed time per iteration (ms): " + python_format_f(f.elapsed_ms, 1) + " |";
  s += " samples per second: " + python_format_f(f.samples_per_s, 3) + " |";
  s += " tokens per second: " + python_format_f(f.tokens_per_s, 3) + " |";
  s += " throughput per GPU (TFLOP/s/GPU): " + python_format_f(f.tflops_per_gpu, 1) + " |";
  s += " learning rate: " + python_format_e(f.learning_rate, 6) + " |";
  s += " global batch size: " + fmt_d(f.global_batch_size, 5) + " |";
  for (const auto& [key, avg] : f.losses)
    if (avg > 0.0) s += " " + key + ": " + python_format_e(avg, 6) + " |";
  s += " loss scale: " + python_format_f(f.loss_scale, 1) + " |";
  s += " grad norm: " + python_format_f(f.grad_norm, 3) + " |";
  s += " number of skipped iterations: " + fmt_d(f.skipped_iterations, 3) + " |";
  s += " number of nan iterations: " + fmt_d(f.nan_iterations, 3) + " |";
  return s;
}

std::string format_eval_block(const std::string& label,
                              const std::vector<std::pair<std::string, double>>& losses) {
  std::string text = " " + label + " | ";
  for (const auto& [key, v] : losses) {
    text += key + " value: " + python_format_e(v, 6) + " | ";
    const double clipped = v < 20.0 ? v : 20.0;  // Python's min(20, v): keeps 20 unless v < 20 (so nan -> 20)
    text += key + " PPL: " + python_format_e(std::exp(clipped), 6) + " | ";
  }
  const std::string dashes(utf8_length(text) + 1, '-');
  return dashes + "\n" + text + "\n" + dashes;
}

std::string format_arguments_block(const std::vector<std::pair<std::string, std::string>>& args) {
  std::vector<std::string> lines;
  lines.reserve(args.size());
  for (const auto& [arg, value] : args) {
    const size_t len = utf8_length(arg);
    const size_t dots = len < 48 ? 48 - len : 0;  // Python: '.' * (48 - len(arg)), empty when negative
    lines.push_back("  " + arg + " " + std::string(dots, '.') + " " + value);
  }
  auto lower = [](const std::string& s) {
    std::string t = s;
    for (char& c : t)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return t;
  };
  std::vector<std::pair<std::string, size_t>> keyed;
  for (size_t i = 0; i < lines.size(); ++i) keyed.emplace_back(lower(lines[i]), i);
  // Python compares str by code point; UTF-8 byte order is the same, if compared unsigned.
  std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) {
    return std::lexicographical_compare(
        a.first.begin(), a.first.end(), b.first.begin(), b.first.end(),
        [](char x, char y) { return static_cast<unsigned char>(x) < static_cast<unsigned char>(y); });
  });
  std::string out = "------------------------ arguments ------------------------";
  for (const auto& [key, i] : keyed) out += "\n" + lines[i];
  out += "\n-------------------- end of arguments ---------------------";
  return out;
}

double megatron_flops_per_iteration(const ModelConfig& cfg, int64_t batch_size, int64_t seq_len,
                                    int64_t padded_vocab, int64_t mtp_layers) {
  DSV3_CHECK(cfg.num_hidden_layers > 0, "FLOPs: num_hidden_layers must be > 0");
  DSV3_CHECK(mtp_layers >= 0, "FLOPs: mtp_layers must be >= 0, got ", mtp_layers);
  // Megatron's layer counts.
  int64_t num_dense = cfg.num_hidden_layers, num_moe = 0, topk = 0, last_is_moe = 0;
  if (cfg.n_routed_experts > 0) {
    num_moe = 0;
    for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) num_moe += cfg.is_moe_layer(i) ? 1 : 0;
    num_dense = cfg.num_hidden_layers - num_moe;
    topk = cfg.num_experts_per_tok;
    last_is_moe = cfg.is_moe_layer(cfg.num_hidden_layers - 1) ? 1 : 0;
  }
  num_moe += last_is_moe * mtp_layers;
  num_dense += (1 - last_is_moe) * mtp_layers;
  const int64_t L = cfg.num_hidden_layers + mtp_layers;
  const int64_t h = cfg.hidden_size, nh = cfg.num_attention_heads;
  const int64_t ffn = cfg.intermediate_size;
  const int64_t moe_ffn = cfg.moe_intermediate_size > 0 ? cfg.moe_intermediate_size : ffn;
  const int64_t shared = cfg.n_shared_experts * cfg.moe_intermediate_size;
  const int64_t qk = cfg.qk_nope_head_dim, qkpe = cfg.qk_rope_head_dim, v = cfg.v_head_dim;
  const int64_t s = seq_len;
  const double glu = 1.5;  // 3 / 2 (SwiGLU)
  const auto d = [](int64_t x) { return static_cast<double>(x); };

  // Each line below is one Python (sub)expression, evaluated in Python's order (int ops exact, then float).
  const double mlp = d(12 * L * h) * ((d(ffn) * glu) * (d(num_dense) / d(L)) +
                                      (d(moe_ffn * topk) * glu) * (d(num_moe) / d(L)) +
                                      (d(shared) * glu) * (d(num_moe) / d(L)));
  const int64_t q_term =
      cfg.q_lora_rank > 0 ? cfg.q_lora_rank * (h + nh * (qk + qkpe) + 1) : h * nh * (qk + qkpe);
  const int64_t attn_int = q_term + cfg.kv_lora_rank * (h + nh * (qk + v) + 1) + h * qkpe + (nh * v) * h;
  const double attn = d(6 * L) * ((d(attn_int) + d(s * (nh * (qk + qkpe))) / 2.0) + d(s * nh * v) / 2.0);
  const int64_t mtp_term = 6 * mtp_layers * (3 * h + 2 * h * h);
  const int64_t logit_term = 6 * h * padded_vocab * (mtp_layers + 1);
  return d(batch_size * s) * (((mlp + attn) + d(mtp_term)) + d(logit_term));
}

std::string timestamp_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace dsv3
