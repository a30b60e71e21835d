// A torch-free dtype tag for kernel launchers in .cu files (which include no torch headers).
#pragma once

namespace latentmoe {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace latentmoe
