// Portable build of the CPU kernels (the compiler's default ISA).
#include <cstdint>

#include "cpu/msda_cpu_problem.h"

#define MSDA_ISA_NS base
#include "cpu/msda_cpu_kernel.h"
#undef MSDA_ISA_NS
