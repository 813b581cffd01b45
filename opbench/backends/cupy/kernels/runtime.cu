// Runtime helpers: the fault-injection spin kernel.
#include "common.cuh"

__device__ __forceinline__ unsigned long long global_ns() {
#ifdef OPB_EMULATE
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
#else
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
#endif
}

// Occupies its stream for about `ns` nanoseconds without burning the SM: queued before an op,
// it widens every race window, so a missing event wait shows up as a wrong answer.
extern "C" __global__ void spin_kernel(long long ns) {
    const unsigned long long start = global_ns();
    while ((long long)(global_ns() - start) < ns) __nanosleep(1000);
}

// Holds its stream until the host writes a non-zero value into *flag (pinned, host-mapped
// memory): deterministic slow work of unbounded length for the COPY_ASYNC contract checks.
extern "C" __global__ void hold_kernel(const volatile int* flag) {
    while (*flag == 0) __nanosleep(2000);
}
