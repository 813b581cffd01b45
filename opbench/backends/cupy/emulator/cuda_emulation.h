// CPU emulation of the CUDA subset opbench's kernels use, so the very .cu sources that NVRTC
// compiles for the GPU also run (compiled by g++) against the float64 oracles on a machine
// without one.
//
// Each CUDA thread of a block is a fiber on the calling OS thread.  A fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a warp shuffle) or exits; when every
// live thread of the block (or of the warp) waits at the barrier, they are released together.
// Blocks run one after another.  This makes a run deterministic, gives shared memory and warp
// shuffles their real meaning, and turns the classic barrier bugs into errors instead of hangs:
// threads waiting at different barriers (divergence), a shuffle from a lane that has exited,
// reading shared memory nobody wrote (it starts as NaN bytes, as uninitialised as on a GPU).
//
// What this does not emulate: timing, memory coalescing, bank conflicts, register limits, the
// memory model between blocks running at once (blocks here are sequential), or PTX.  Kernels
// keep their PTX in `#ifndef OPB_EMULATE` branches with a host equivalent beside it.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// emulator/build.py rewrites every `__shared__` declaration into a reference to the block's
// shared memory (static_shared / dynamic_smem below); one it could not rewrite fails to compile.
#define __shared__ __shared___declaration_not_rewritten_by_the_emulator

namespace opb {

// Fiber switches.  On x86-64 a six-register switch (a few nanoseconds: a grid of a million
// threads costs milliseconds, not seconds); elsewhere ucontext, whose swapcontext also saves
// the signal mask with a system call.
#if defined(__x86_64__)
extern "C" void opb_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden opb_switch_stack
    .globl opb_switch_stack
    .type opb_switch_stack, @function
opb_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size opb_switch_stack, .-opb_switch_stack
)");
struct Context {
    void* sp = nullptr;
};
inline void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                  // entry's return address: it never returns
    *--sp = (void*)entry;             // popped by `ret` in opb_switch_stack
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
    c.sp = sp;
}
inline void context_switch(Context& from, Context& to) { opb_switch_stack(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
inline void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum class Wait { running, block, warp, done };

struct Fiber {
    Context context;
    dim3 thread_idx;
    int linear = 0, warp = 0, lane = 0;
    Wait wait = Wait::running;
};

struct Block {
    dim3 block_idx, block_dim, grid_dim;
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>>* stacks = nullptr;
    Context scheduler;
    Fiber* current = nullptr;
    std::vector<uint64_t> shuffle_slots;
    unsigned char* dynamic_smem = nullptr;
    std::vector<unsigned char> static_smem;  // __shared__ arrays, placed on first use
    std::vector<std::pair<int, size_t>> static_sites;  // (declaration, offset)
    size_t static_used = 0;
    void (*body)(void*) = nullptr;
    void* body_data = nullptr;
    std::string error;
};

inline thread_local Block* current_block = nullptr;
constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t STATIC_SHARED_BYTES = 48 * 1024;  // CUDA's limit for static __shared__

inline void fail(const std::string& message) {
    Block* b = current_block;
    if (b->error.empty()) b->error = message;
    b->current->wait = Wait::done;
    context_switch(b->current->context, b->scheduler);  // never resumed
}

inline void wait_at(Wait barrier) {
    Block* b = current_block;
    b->current->wait = barrier;
    context_switch(b->current->context, b->scheduler);
}

inline std::string thread_name(const Fiber& f) {
    char text[64];
    std::snprintf(text, sizeof text, "(%u,%u,%u)", f.thread_idx.x, f.thread_idx.y,
                  f.thread_idx.z);
    return text;
}

inline void fiber_entry() {
    Block* b = current_block;
    b->body(b->body_data);
    b->current->wait = Wait::done;
    context_switch(b->current->context, b->scheduler);  // never resumed
}

// Releases a warp whose live lanes all wait at a warp barrier, else the block when every live
// thread waits at __syncthreads; false when neither holds (divergent barriers).
inline bool release(Block& b) {
    bool released = false;
    const int n = (int)b.fibers.size();
    for (int w0 = 0; w0 < n; w0 += 32) {
        bool any = false, all = true;
        for (int t = w0; t < std::min(n, w0 + 32); ++t) {
            Wait s = b.fibers[t].wait;
            if (s == Wait::done) continue;
            any = true;
            all = all && s == Wait::warp;
        }
        if (any && all) {
            for (int t = w0; t < std::min(n, w0 + 32); ++t)
                if (b.fibers[t].wait == Wait::warp) b.fibers[t].wait = Wait::running;
            released = true;
        }
    }
    if (released) return true;
    bool any = false;
    for (auto& f : b.fibers) {
        if (f.wait == Wait::done) continue;
        if (f.wait != Wait::block) return false;
        any = true;
    }
    for (auto& f : b.fibers)
        if (f.wait == Wait::block) f.wait = Wait::running;
    return any;
}

inline std::string divergence_report(const Block& b) {
    std::string at_block, at_warp;
    for (auto& f : b.fibers) {
        if (f.wait == Wait::block && at_block.size() < 200) at_block += thread_name(f) + " ";
        if (f.wait == Wait::warp && at_warp.size() < 200) at_warp += thread_name(f) + " ";
    }
    return "barrier divergence: threads " + at_block + "wait at __syncthreads while " +
           at_warp + "wait at a warp barrier (__syncwarp / shuffle)";
}

inline void run_block(Block& b) {
    const int n = (int)b.fibers.size();
    for (int t = 0; t < n; ++t) {
        Fiber& f = b.fibers[t];
        f.wait = Wait::running;
        context_start(f.context, (*b.stacks)[t].data(), STACK_BYTES, fiber_entry);
    }
    for (;;) {
        bool live = false;
        for (auto& f : b.fibers) {
            if (f.wait != Wait::running) continue;
            b.current = &f;
            context_switch(b.scheduler, f.context);
            if (!b.error.empty()) return;
        }
        for (auto& f : b.fibers) live = live || f.wait != Wait::done;
        if (!live) return;
        if (!release(b)) {
            b.error = divergence_report(b);
            return;
        }
    }
}

inline std::string block_name(const dim3& i) {
    char text[64];
    std::snprintf(text, sizeof text, "block (%u,%u,%u)", i.x, i.y, i.z);
    return text;
}

// Runs body(data) as every thread of every block; returns "" or the first error.
inline std::string run_grid(dim3 grid, dim3 block_dim, size_t shared_bytes,
                            void (*body)(void*), void* data) {
    const size_t threads = (size_t)block_dim.x * block_dim.y * block_dim.z;
    thread_local std::vector<std::vector<char>> stacks;
    while (stacks.size() < threads) stacks.emplace_back(STACK_BYTES);
    std::vector<unsigned char> smem(shared_bytes + 16);
    Block b;
    b.block_dim = block_dim;
    b.grid_dim = grid;
    b.stacks = &stacks;
    b.body = body;
    b.body_data = data;
    b.fibers.resize(threads);
    b.static_smem.assign(STATIC_SHARED_BYTES, 0xff);
    b.shuffle_slots.assign(threads, 0);
    for (size_t t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.linear = (int)t;
        f.warp = (int)(t / 32);
        f.lane = (int)(t % 32);
        f.thread_idx = dim3{(unsigned)(t % block_dim.x),
                            (unsigned)(t / block_dim.x % block_dim.y),
                            (unsigned)(t / (block_dim.x * block_dim.y))};
    }
    Block* outer = current_block;
    current_block = &b;
    std::string error;
    for (unsigned z = 0; z < grid.z && error.empty(); ++z)
        for (unsigned y = 0; y < grid.y && error.empty(); ++y)
            for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
                b.block_idx = dim3{x, y, z};
                std::memset(smem.data(), 0xff, smem.size());  // NaN until written
                b.dynamic_smem = smem.data();
                std::memset(b.static_smem.data(), 0xff, b.static_smem.size());
                b.static_sites.clear();
                b.static_used = 0;
                b.error.clear();
                run_block(b);
                if (!b.error.empty()) error = block_name(b.block_idx) + ": " + b.error;
            }
    current_block = outer;
    return error;
}

inline unsigned char* dynamic_smem() { return current_block->dynamic_smem; }

// The block's copy of static __shared__ declaration `site`: placed (16-byte aligned) when the
// first thread reaches it, the same storage for every other thread of the block.
inline unsigned char* static_shared(int site, size_t bytes) {
    Block* b = current_block;
    for (auto& [s, offset] : b->static_sites)
        if (s == site) return b->static_smem.data() + offset;
    const size_t offset = (b->static_used + 15) / 16 * 16;
    if (offset + bytes > b->static_smem.size()) {
        fail("static __shared__ memory over " + std::to_string(STATIC_SHARED_BYTES) + " bytes");
    }
    b->static_sites.emplace_back(site, offset);
    b->static_used = offset + bytes;
    return b->static_smem.data() + offset;
}

template <typename T>
T shuffle_xor(T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
    Block* b = current_block;
    Fiber* f = b->current;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    b->shuffle_slots[f->linear] = bits;
    wait_at(Wait::warp);  // every live lane has written its value
    const int source = f->warp * 32 + (f->lane ^ lane_mask);
    if (source >= (int)b->fibers.size() || b->fibers[source].wait == Wait::done)
        fail("__shfl_xor_sync by thread " + thread_name(*f) + " reads lane " +
             std::to_string(f->lane ^ lane_mask) + ", which does not exist or has exited");
    T out;
    std::memcpy(&out, &b->shuffle_slots[source], sizeof(T));
    wait_at(Wait::warp);  // every lane has read before anyone writes the next value
    return out;
}

template <typename... P, size_t... I>
void invoke(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <typename... P>
int launch(void (*kernel)(P...), const unsigned* grid, const unsigned* block,
           size_t shared_bytes, void** args, char* error, size_t error_len) {
    struct Call {
        void (*kernel)(P...);
        void** args;
    } call{kernel, args};
    auto body = [](void* data) {
        auto* c = static_cast<Call*>(data);
        invoke(c->kernel, c->args, std::index_sequence_for<P...>{});
    };
    std::string message = run_grid(dim3{grid[0], grid[1], grid[2]},
                                   dim3{block[0], block[1], block[2]}, shared_bytes, body, &call);
    if (message.empty()) return 0;
    std::snprintf(error, error_len, "%s", message.c_str());
    return 1;
}

// Byte sizes of the kernel's parameters, so the host can refuse an argument of the wrong width
// (a float passed where the kernel takes a double is silent garbage on a GPU).
template <typename... P>
int param_sizes(void (*)(P...), size_t* out, int capacity) {
    const size_t sizes[] = {sizeof(P)..., 0};
    const int n = (int)sizeof...(P);
    for (int i = 0; i < n && i < capacity; ++i) out[i] = sizes[i];
    return n;
}

}  // namespace opb

#define threadIdx (::opb::current_block->current->thread_idx)
#define blockIdx (::opb::current_block->block_idx)
#define blockDim (::opb::current_block->block_dim)
#define gridDim (::opb::current_block->grid_dim)

inline void __syncthreads() { ::opb::wait_at(::opb::Wait::block); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::opb::wait_at(::opb::Wait::warp); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    return ::opb::shuffle_xor(value, lane_mask);
}
// Fibers of one OS thread never interleave inside an atomic, but two streams run on two
// OS threads: use real atomics.
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::max;
using std::min;
inline long long min(long long a, int b) { return a < b ? a : (long long)b; }
inline long long min(int a, long long b) { return a < b ? (long long)a : b; }
inline long long max(long long a, int b) { return a > b ? a : (long long)b; }
inline long long max(int a, long long b) { return a > b ? (long long)a : b; }
