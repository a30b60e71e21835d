// Host stand-in for <cuda_fp16.h>: __half with round-to-nearest-even conversion (see ../emu.h).
#pragma once
#include "../emu.h"
