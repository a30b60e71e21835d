// Host stand-in for <cuda_runtime.h> (see ../emu.h): the types and calls the MLA launchers use.
#pragma once
#include "../emu.h"
