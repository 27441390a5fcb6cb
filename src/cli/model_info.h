// `dsv3 model-info --model-config FILE`: prints a model's layer plan, semantics and parameter counts.
#pragma once

namespace dsv3::cli {

int model_info_main(int argc, char** argv);

}  // namespace dsv3::cli
