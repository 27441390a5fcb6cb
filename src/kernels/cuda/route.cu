// The router on the GPU (Backend::route_forward / route_backward): the bodies of kernels/route.h, one thread per
// token, expert, row or sequence, so the device takes the CPU router's decisions with the CPU's arithmetic. Each thread
// walks its own row (E ≤ a few hundred floats): simple and deterministic; the work is small beside the GEMMs.
#include "kernels/cuda/kernels.cuh"
#include "kernels/route.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 128;

unsigned grid(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}
__device__ int64_t item() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}

__global__ void select_kernel(RouteSelect c, int64_t t_n, const float* logits, const float* bias, float* s,
                              int32_t* idx, float* w, float* denom, float* choice, float* group,
                              int32_t* order, DeviceErrors err) {
  const int64_t t = item();
  if (t >= t_n) return;
  const float* lg = logits + t * c.e;
  for (int32_t e = 0; e < c.e; ++e)
    if (!isfinite(lg[e])) {  // first error wins: the token and the expert, raised at the next sync
      if (atomicCAS(err.word, kNoError, kBadRouterLogit) == kNoError)
        err.word[1] = static_cast<int>(t), err.word[2] = e;
      break;
    }
  route::select_token(c, lg, bias, s + t * c.e, idx + t * c.k, w + t * c.k, denom + t, choice + t * c.e,
                      group + t * c.n_group, order + t * c.e);
}

__global__ void count_kernel(int32_t e_n, const int32_t* idx, const uint8_t* kept, int64_t r,
                             int32_t* offsets) {
  const int64_t e = item();
  if (e < e_n) route::count_expert(static_cast<int32_t>(e), idx, kept, r, offsets);
}

__global__ void scan_kernel(int32_t e_n, int32_t* offsets) {
  route::scan_offsets(e_n, offsets);
}

__global__ void permute_kernel(int32_t e_n, const int32_t* idx, const uint8_t* kept, int64_t r, int32_t k,
                               const int32_t* offsets, int32_t* token_R, int32_t* slot_R, int32_t* row_TK) {
  const int64_t e = item();
  if (e < e_n)
    route::permute_expert(static_cast<int32_t>(e), idx, kept, r, k, offsets, token_R, slot_R, row_TK);
}

__global__ void capacity_kernel(int64_t r_n, const int32_t* idx, const int32_t* routed, const int32_t* slot_R,
                                const float* w, int32_t k, int64_t seq, int64_t batch, int64_t cap,
                                bool by_position, uint8_t* kept) {
  const int64_t r = item();
  if (r < r_n) route::capacity_row(r, idx, routed, slot_R, w, k, seq, batch, cap, by_position, kept);
}

__global__ void aux_token_kernel(int64_t t_n, int32_t e_n, int32_t k, const float* logits, float* z, float* p,
                                 int32_t* map, int32_t* order) {
  const int64_t t = item();
  if (t < t_n) route::aux_token(e_n, k, logits + t * e_n, z + t, p + t * e_n, map + t * k, order + t * e_n);
}

__global__ void aux_expert_kernel(int64_t batch, int64_t seq, int32_t e_n, int32_t k, const float* p,
                                  const int32_t* map, float* psum, int32_t* count) {
  const int64_t i = item();
  if (i < batch * e_n)
    route::aux_expert(i / e_n, static_cast<int32_t>(i % e_n), seq, e_n, k, p, map, psum, count);
}

__global__ void aux_loss_kernel(int64_t batch, int64_t seq, int32_t e_n, int32_t k, float coeff,
                                const float* psum, const int32_t* count, float* loss) {
  *loss = route::aux_loss(batch, seq, e_n, k, coeff, psum, count);
}

__global__ void aux_grad_kernel(int64_t t_n, int64_t batch, int64_t seq, int32_t e_n, int32_t k, float coeff,
                                const float* logits, const float* z, const int32_t* count, float* dl) {
  const int64_t t = item();
  if (t < t_n)
    route::aux_grad_token(t / seq, batch, seq, e_n, k, coeff, logits + t * e_n, z[t], count, dl + t * e_n);
}

__global__ void backward_kernel(RouteSelect c, int64_t t_n, const float* s, const int32_t* idx,
                                const uint8_t* kept, const float* denom, const float* g, const float* aux,
                                float aux_grad, float* dl) {
  const int64_t t = item();
  if (t < t_n)
    route::backward_token(c, s + t * c.e, idx + t * c.k, kept ? kept + t * c.k : nullptr, denom[t],
                          g + t * c.k, aux ? aux + t * c.e : nullptr, aux_grad, dl + t * c.e);
}

// The permutation by expert (kept: nullable), offsets first.
void permute_by_expert(const RouteForwardArgs& a, const uint8_t* kept, cudaStream_t st) {
  const RouteSelect& c = a.cfg;
  const int64_t r = a.t * c.k;
  count_kernel<<<grid(c.e), kThreads, 0, st>>>(c.e, a.idx_TK, kept, r, a.offsets_E1);
  scan_kernel<<<1, 1, 0, st>>>(c.e, a.offsets_E1);
  permute_kernel<<<grid(c.e), kThreads, 0, st>>>(c.e, a.idx_TK, kept, r, c.k, a.offsets_E1, a.token_R,
                                                 a.slot_R, a.row_TK);
}

size_t up(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

}  // namespace

size_t route_forward_scratch_bytes(const RouteForwardArgs& a) {
  const size_t t = static_cast<size_t>(a.t), e = static_cast<size_t>(a.cfg.e),
               k = static_cast<size_t>(a.cfg.k);
  const size_t g = static_cast<size_t>(a.cfg.n_group), b = static_cast<size_t>(a.batch);
  size_t n = up(t * e * 4) * 2 + up(t * g * 4);  // choice, order, group
  if (a.aux_coeff > 0.f)
    n += up(t * 4) + up(t * e * 4) + up(t * k * 4) + 2 * up(b * e * 4);  // z, p, map, psum, count
  return n;
}

void launch_route_forward(const RouteForwardArgs& a, void* scratch, DeviceErrors err, cudaStream_t st) {
  const RouteSelect& c = a.cfg;
  const int64_t t_n = a.t, r = t_n * c.k;
  char* at = static_cast<char*>(scratch);
  auto take = [&](size_t bytes) {
    void* p = at;
    at += up(bytes);
    return p;
  };
  float* choice = static_cast<float*>(take(t_n * c.e * 4));
  int32_t* order = static_cast<int32_t*>(take(t_n * c.e * 4));
  float* group = static_cast<float*>(take(t_n * c.n_group * 4));
  if (t_n > 0)
    select_kernel<<<grid(t_n), kThreads, 0, st>>>(c, t_n, a.logits_TE, a.bias_E, a.scores_TE, a.idx_TK,
                                                  a.weight_TK, a.denom_T, choice, group, order, err);
  permute_by_expert(a, nullptr, st);
  if (a.capacity >= 0) {  // the capacity rule over each expert's candidates, then the kept pairs' permutation
    cudaMemcpyAsync(a.routed_E1, a.offsets_E1, (c.e + 1) * sizeof(int32_t), cudaMemcpyDeviceToDevice, st);
    if (r > 0)
      capacity_kernel<<<grid(r), kThreads, 0, st>>>(r, a.idx_TK, a.routed_E1, a.slot_R, a.weight_TK, c.k,
                                                    t_n / a.batch, a.batch, a.capacity, a.drop_by_position,
                                                    a.kept_TK);
    permute_by_expert(a, a.kept_TK, st);
  }
  if (a.aux_coeff <= 0.f) return;
  if (t_n == 0) {
    cudaMemsetAsync(a.aux_loss_1, 0, sizeof(float), st);
    return;
  }
  const int64_t seq = t_n / a.batch;
  float* z = static_cast<float*>(take(t_n * 4));
  float* p = static_cast<float*>(take(t_n * c.e * 4));
  int32_t* map = static_cast<int32_t*>(take(t_n * c.k * 4));
  float* psum = static_cast<float*>(take(a.batch * c.e * 4));
  int32_t* count = static_cast<int32_t*>(take(a.batch * c.e * 4));
  aux_token_kernel<<<grid(t_n), kThreads, 0, st>>>(t_n, c.e, c.k, a.logits_TE, z, p, map, order);
  aux_expert_kernel<<<grid(a.batch * c.e), kThreads, 0, st>>>(a.batch, seq, c.e, c.k, p, map, psum, count);
  aux_loss_kernel<<<1, 1, 0, st>>>(a.batch, seq, c.e, c.k, a.aux_coeff, psum, count, a.aux_loss_1);
  aux_grad_kernel<<<grid(t_n), kThreads, 0, st>>>(t_n, a.batch, seq, c.e, c.k, a.aux_coeff, a.logits_TE, z,
                                                  count, a.aux_dlogits_TE);
}

void launch_route_backward(const RouteBackwardArgs& a, cudaStream_t st) {
  if (a.t == 0) return;
  backward_kernel<<<grid(a.t), kThreads, 0, st>>>(a.cfg, a.t, a.scores_TE, a.idx_TK, a.kept_TK, a.denom_T,
                                                  a.dweight_TK, a.aux_dlogits_TE, a.aux_grad, a.dlogits_TE);
}

}  // namespace dsv3::cuda
