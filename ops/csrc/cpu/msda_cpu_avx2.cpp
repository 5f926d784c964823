// AVX2 + FMA build of the CPU kernels, picked at run time when the CPU has
// them (see msda_cpu.cpp). Only this file's own code is compiled for AVX2:
// it includes no library header after the target switch.
#include <cstdint>

#include "cpu/msda_cpu_problem.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DETR_PLUS_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MSDA_ISA_NS avx2
#include "cpu/msda_cpu_kernel.h"
#undef MSDA_ISA_NS
#pragma GCC pop_options
#else
// Not an x86 GCC/Clang build: the "avx2" variant is the portable one.
#define MSDA_ISA_NS avx2
#include "cpu/msda_cpu_kernel.h"
#undef MSDA_ISA_NS
#endif
