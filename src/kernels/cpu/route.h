// The router's pipeline (kernels/route.h) run on the CPU: the CPU backend's route_forward and route_backward and the
// host router (moe/router.cpp), item by item with the same bodies a CUDA kernel runs, so the device path of the MoE
// layer is exercised on any machine. route_forward_host permutes only when given token_R (capacity needs it).
#pragma once
#include "kernels/route.h"

namespace dsv3 {

// Throws dsv3::Error naming the token and expert of a non-finite logit, as the host router does.
void route_forward_host(const RouteForwardArgs& a);
void route_backward_host(const RouteBackwardArgs& a);

}  // namespace dsv3
