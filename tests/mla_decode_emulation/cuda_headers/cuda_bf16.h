// Host stand-in for <cuda_bf16.h>: __nv_bfloat16 with round-to-nearest-even conversion (see ../emu.h).
#pragma once
#include "../emu.h"
