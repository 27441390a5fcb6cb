// CUTLASS's Hopper pointer-array grouped GEMM for the MoE's expert GEMMs (grouped_gemm.cuh): bf16 operands, fp32
// accumulation and output, 128x128x64 tiles, cooperative warp-specialized persistent kernel, no split-K
// (deterministic). One instantiation per operand layout, each in its own file (nvcc takes ~30 s per kernel).
//
// The group shapes and pointers live in device memory, written by setup_groups from the row offsets there: the
// host never learns the per-expert row counts. An expert without rows is the empty problem (0, 0, 0): CUTLASS's
// group scheduler gives it no tiles, so its output (or, for kReduce, its accumulating gradient) is untouched.
#pragma once
#include <cstdint>

// CUTLASS's headers in its own examples' order.
// clang-format off
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
// clang-format on

#include "core/error.h"
#include "kernels/cuda/grouped_gemm.cuh"

namespace dsv3::cuda::grouped {

using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
using Shape3 = Problem::UnderlyingProblemShape;

// LayoutA/LayoutB in CUTLASS's tags (A is M×K, B is K×N): RowMajor A is K-major, ColumnMajor A M-major;
// ColumnMajor B is K-major ([n, k] rows, a linear's weight), RowMajor B N-major. ElementC: float (D = A·B + C,
// accumulating in place) or void (D = A·B).
template <class LayoutA, class LayoutB, class ElementC>
struct Kernel {
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using RowMajor = cutlass::layout::RowMajor;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, RowMajor*, 4, float, RowMajor*,
      4, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<float, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::bfloat16_t, LayoutA*, 8,
      cutlass::bfloat16_t, LayoutB*, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideC = typename GemmKernel::InternalStrideC;
  using StrideD = typename GemmKernel::InternalStrideD;
  static constexpr bool kAccumulate = !cute::is_void_v<ElementC>;
};

// A stride with leading dimension ld: the one dynamic mode of a (rows, cols, batch) stride whose unit mode is
// static.
template <class S>
__host__ __device__ S leading(int64_t ld) {
  S s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value)
    cute::get<1>(s) = ld;
  else
    cute::get<0>(s) = ld;
  return s;
}

// The per-group arrays CUTLASS reads, carved from the scratch.
template <class K>
struct Arrays {
  Shape3* shapes;
  const cutlass::bfloat16_t** a;
  const cutlass::bfloat16_t** b;
  const float** c;
  float** d;
  typename K::StrideA* sa;
  typename K::StrideB* sb;
  typename K::StrideC* sc;
  typename K::StrideD* sd;
  void* workspace;
  size_t bytes;  // of the arrays, before the workspace
};

inline size_t round_up(size_t x) {
  return (x + 255) / 256 * 256;
}

template <class K>
Arrays<K> carve(void* base, int groups) {
  Arrays<K> r{};
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](auto*& field, size_t el) {
    field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(p ? p + off : nullptr);
    off += round_up(el * static_cast<size_t>(groups));
  };
  take(r.shapes, sizeof(Shape3));
  take(r.a, sizeof(void*)), take(r.b, sizeof(void*)), take(r.c, sizeof(void*)), take(r.d, sizeof(void*));
  take(r.sa, sizeof(typename K::StrideA)), take(r.sb, sizeof(typename K::StrideB));
  take(r.sc, sizeof(typename K::StrideC)), take(r.sd, sizeof(typename K::StrideD));
  r.bytes = off;
  r.workspace = p ? p + off : nullptr;
  return r;
}

// One thread per group: its shape, operand pointers and strides from the row offsets (grouped_gemm.cuh).
template <class K>
__global__ void setup_groups(GroupedGemmArgs g, Arrays<K> r) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= g.groups) return;
  const int64_t o = g.offsets_G1[e], rows = g.offsets_G1[e + 1] - o;
  const auto* a = reinterpret_cast<const cutlass::bfloat16_t*>(g.a);
  const auto* b = reinterpret_cast<const cutlass::bfloat16_t*>(g.b);
  r.a[e] = a + o * g.lda;
  if (g.kind == GroupedGemmArgs::Kind::kRows) {
    r.shapes[e] = rows > 0 ? Shape3{static_cast<int>(rows), static_cast<int>(g.n), static_cast<int>(g.k)}
                           : Shape3{0, 0, 0};
    r.b[e] = b + e * g.b_stride;
    r.c[e] = nullptr;
    r.d[e] = g.c + o * g.ldc;
  } else {
    r.shapes[e] = rows > 0 ? Shape3{static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(rows)}
                           : Shape3{0, 0, 0};
    r.b[e] = b + o * g.ldb;
    r.c[e] = g.c + e * g.c_stride;
    r.d[e] = g.c + e * g.c_stride;
  }
  r.sa[e] = leading<typename K::StrideA>(g.lda);
  r.sb[e] = leading<typename K::StrideB>(g.ldb);
  r.sc[e] = leading<typename K::StrideC>(g.ldc);
  r.sd[e] = leading<typename K::StrideD>(g.ldc);
}

template <class K>
typename K::Gemm::Arguments arguments(const Arrays<K>& r, int groups, int sm_count, int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device, hw.sm_count = sm_count;
  typename K::Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {groups, r.shapes, nullptr};  // no host shapes: the row counts stay on the GPU
  args.mainloop = {r.a, r.sa, r.b, r.sb};
  auto& f = args.epilogue.thread;
  f.alpha = 1.f, f.beta = K::kAccumulate ? 1.f : 0.f;
  if constexpr (K::kAccumulate)
    args.epilogue.ptr_C = r.c, args.epilogue.dC = r.sc;
  else
    args.epilogue.ptr_C = nullptr, args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = r.d, args.epilogue.dD = r.sd;
  args.hw_info = hw;
  return args;
}

template <class K>
size_t scratch(int groups, int sm_count) {
  const Arrays<K> r = carve<K>(nullptr, groups);
  return r.bytes + round_up(K::Gemm::get_workspace_size(arguments(r, groups, sm_count, 0)));
}

template <class K>
void launch(const GroupedGemmArgs& g, void* base, size_t bytes, int sm_count, int device, cudaStream_t st) {
  const int groups = static_cast<int>(g.groups);
  const Arrays<K> r = carve<K>(base, groups);
  DSV3_CHECK(bytes >= scratch<K>(groups, sm_count), "grouped GEMM: scratch too small");
  // The workspace holds per-SM TMA descriptors, which need 64-byte alignment (cudaMalloc gives 256).
  DSV3_CHECK(reinterpret_cast<uintptr_t>(base) % 256 == 0, "grouped GEMM: scratch not 256-byte aligned");
  setup_groups<K><<<(groups + 127) / 128, 128, 0, st>>>(g, r);
  const auto args = arguments(r, groups, sm_count, device);
  typename K::Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  DSV3_CHECK(s == cutlass::Status::kSuccess,
             "grouped GEMM: CUTLASS cannot run it: ", cutlass::cutlassGetStatusString(s));
  s = gemm.initialize(args, r.workspace, st);
  DSV3_CHECK(s == cutlass::Status::kSuccess,
             "grouped GEMM: initialize: ", cutlass::cutlassGetStatusString(s));
  s = gemm.run(st);
  DSV3_CHECK(s == cutlass::Status::kSuccess, "grouped GEMM: launch: ", cutlass::cutlassGetStatusString(s));
}

}  // namespace dsv3::cuda::grouped
