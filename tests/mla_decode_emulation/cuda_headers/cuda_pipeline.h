// Host stand-in for <cuda_pipeline.h>: the async-copy primitives live in ../emu.h.
#pragma once
#include "../emu.h"
