#include "optim/grad_clip.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

double clip_coefficient(double total_norm, double max_norm) {
  const double c = max_norm / (total_norm + 1.0e-6);
  return c < 1.0 ? c : 1.0;
}

}  // namespace dsv3
