// cuDNN's fused attention through cudnn-frontend (cudnn_attention.h): one graph per shape and direction, built on
// first use and cached with its execution plan.
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include "kernels/cuda/cudnn_attention.h"

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <cstring>
#include <map>
#include <tuple>

#include "core/error.h"

// cudnn-frontend's dynamic loading resolves every cuDNN call through this handle (dlopen'ed in open()).
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace dsv3::cuda {
namespace fe = cudnn_frontend;
namespace {

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t, bool>;
Key key_of(const AttentionShape& s, bool backward) {
  uint32_t scale = 0;
  std::memcpy(&scale, &s.scale, sizeof scale);
  return {s.batch, s.seq, s.heads, s.d_qk, s.d_v, scale, backward};
}

// Packed bf16 [B, S, H, D] seen as cuDNN's [B, H, S, D].
fe::graph::Tensor_attributes heads(const char* name, int64_t uid, const AttentionShape& s, int64_t d) {
  return fe::graph::Tensor_attributes()
      .set_name(name)
      .set_uid(uid)
      .set_dim({s.batch, s.heads, s.seq, d})
      .set_stride({s.seq * s.heads * d, d, s.heads * d, 1});
}
fe::graph::Tensor_attributes stats(const AttentionShape& s) {  // fp32 [B, H, S, 1]
  return fe::graph::Tensor_attributes()
      .set_name("stats")
      .set_uid(kStats)
      .set_dim({s.batch, s.heads, s.seq, 1})
      .set_stride({s.heads * s.seq, s.seq, 1, 1})
      .set_data_type(fe::DataType_t::FLOAT);
}

void ok(fe::error_t e, const char* step, const AttentionShape& s) {
  DSV3_CHECK(e.is_good(), "cuDNN attention (batch ", s.batch, ", seq ", s.seq, ", heads ", s.heads, ", d_qk ",
             s.d_qk, ", d_v ", s.d_v, "): ", step, ": ", e.get_message());
}

}  // namespace

struct CudnnAttention::Impl {
  cudnnHandle_t handle = nullptr;
  std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;
  std::map<Key, std::string> refused;  // forward keys of shapes cuDNN does not run, and why

  std::shared_ptr<fe::graph::Graph> graph(const AttentionShape& s, bool backward) {
    auto& g = graphs[key_of(s, backward)];
    if (g) return g;
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = graph->tensor(heads("q", kQ, s, s.d_qk));
    auto k = graph->tensor(heads("k", kK, s, s.d_qk));
    auto v = graph->tensor(heads("v", kV, s, s.d_v));
    if (!backward) {
      auto opt = fe::graph::SDPA_attributes()
                     .set_name("sdpa")
                     .set_generate_stats(true)
                     .set_attn_scale(s.scale)
                     .set_causal_mask(true);
      auto [o, st] = graph->sdpa(q, k, v, opt);
      const auto o_attr = heads("o", kO, s, s.d_v);
      o->set_output(true).set_uid(kO).set_dim(o_attr.get_dim()).set_stride(o_attr.get_stride());
      const auto st_attr = stats(s);
      st->set_output(true)
          .set_uid(kStats)
          .set_dim(st_attr.get_dim())
          .set_stride(st_attr.get_stride())
          .set_data_type(fe::DataType_t::FLOAT);
    } else {
      auto o = graph->tensor(heads("o", kO, s, s.d_v));
      auto d_o = graph->tensor(heads("dO", kDO, s, s.d_v));
      auto st = graph->tensor(stats(s));
      auto opt = fe::graph::SDPA_backward_attributes()
                     .set_name("sdpa_backward")
                     .set_attn_scale(s.scale)
                     .set_causal_mask(true)
                     .set_deterministic_algorithm(true);
      auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, st, opt);
      for (auto& [t, uid, d] : {std::tuple{dq, kDQ, s.d_qk}, {dk, kDK, s.d_qk}, {dv, kDV, s.d_v}}) {
        const auto a = heads("d", uid, s, d);
        t->set_output(true).set_uid(uid).set_dim(a.get_dim()).set_stride(a.get_stride());
      }
    }
    ok(graph->validate(), "validate", s);
    ok(graph->build_operation_graph(handle), "build_operation_graph", s);
    ok(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans", s);
    ok(graph->check_support(handle), "check_support", s);
    ok(graph->build_plans(handle), "build_plans", s);
    return g = graph;
  }
};

std::unique_ptr<CudnnAttention> CudnnAttention::open(std::string* why_not) {
  if (!cudnn_frontend::cudnn_dlhandle) {
    cudnn_frontend::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
    if (!cudnn_frontend::cudnn_dlhandle) {
      const char* e = dlerror();
      *why_not = std::string("cannot open libcudnn.so.9: ") + (e ? e : "unknown error");
      return nullptr;
    }
  }
  auto impl = std::make_unique<Impl>();
  if (fe::detail::create_handle(&impl->handle) != CUDNN_STATUS_SUCCESS) {
    *why_not = "cudnnCreate failed";
    return nullptr;
  }
  return std::unique_ptr<CudnnAttention>(new CudnnAttention(std::move(impl)));
}

CudnnAttention::CudnnAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnAttention::~CudnnAttention() {
  impl_->graphs.clear();
  if (impl_->handle) fe::detail::destroy_handle(impl_->handle);
}

bool CudnnAttention::supports(const AttentionShape& s, std::string* why_not) {
  const Key key = key_of(s, false);
  if (impl_->graphs.count(key) && impl_->graphs.count(key_of(s, true))) return true;
  std::string why;
  if (impl_->refused.count(key)) {
    return false;  // said when first refused
  } else if (s.d_qk % 8 || s.d_v % 8) {
    why = "cuDNN needs head sizes that are multiples of 8";
  } else {
    try {
      impl_->graph(s, false), impl_->graph(s, true);
      return true;
    } catch (const std::exception& e) {  // the frontend throws std::runtime_error too
      why = e.what();
    }
  }
  impl_->graphs.erase(key), impl_->graphs.erase(key_of(s, true));
  impl_->refused[key] = why;
  if (why_not) *why_not = why;
  return false;
}

size_t CudnnAttention::forward_workspace(const AttentionShape& s) {
  return static_cast<size_t>(impl_->graph(s, false)->get_workspace_size());
}
size_t CudnnAttention::backward_workspace(const AttentionShape& s) {
  return static_cast<size_t>(impl_->graph(s, true)->get_workspace_size());
}

void CudnnAttention::forward(const AttentionShape& s, const void* q, const void* k, const void* v, void* o,
                             float* lse_BHS, void* workspace, cudaStream_t st) {
  auto g = impl_->graph(s, false);
  DSV3_CHECK(fe::detail::set_stream(impl_->handle, st) == CUDNN_STATUS_SUCCESS, "cudnnSetStream failed");
  std::unordered_map<int64_t, void*> pack = {{kQ, const_cast<void*>(q)},
                                             {kK, const_cast<void*>(k)},
                                             {kV, const_cast<void*>(v)},
                                             {kO, o},
                                             {kStats, lse_BHS}};
  ok(g->execute(impl_->handle, pack, workspace), "execute", s);
}

void CudnnAttention::backward(const AttentionShape& s, const void* q, const void* k, const void* v,
                              const void* o, const void* d_o, const float* lse_BHS, void* dq, void* dk,
                              void* dv, void* workspace, cudaStream_t st) {
  auto g = impl_->graph(s, true);
  DSV3_CHECK(fe::detail::set_stream(impl_->handle, st) == CUDNN_STATUS_SUCCESS, "cudnnSetStream failed");
  std::unordered_map<int64_t, void*> pack = {{kQ, const_cast<void*>(q)},
                                             {kK, const_cast<void*>(k)},
                                             {kV, const_cast<void*>(v)},
                                             {kO, const_cast<void*>(o)},
                                             {kDO, const_cast<void*>(d_o)},
                                             {kStats, const_cast<float*>(lse_BHS)},
                                             {kDQ, dq},
                                             {kDK, dk},
                                             {kDV, dv}};
  ok(g->execute(impl_->handle, pack, workspace), "execute", s);
}

}  // namespace dsv3::cuda
