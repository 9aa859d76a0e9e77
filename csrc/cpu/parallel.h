// at::parallel_for for the CPU kernels. It is inline, and in torch's wheels OpenMP-based: a file
// that calls it without -fopenmp runs it on one thread, silently (CMakeLists.txt gives the
// flag). The in-place steps (csrc/cpu/inplace.cpp) once ran on one thread that way, so it is
// an error.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "at::parallel_for is OpenMP-based in this torch: compile this file with -fopenmp"
#endif
