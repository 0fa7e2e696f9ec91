// CPU emulation runtime for GPU kernels: one OS thread per SIMD lane, real
// barriers. Threadgroups run one after another; the threads of a threadgroup
// run concurrently. SIMD-group collectives exchange values through a
// double-buffered slot array guarded by a 32-thread barrier, so every lane
// sees the same 32 values and computes the same result.
//
// Everything the runtime needs from the standard library is included here,
// before the shims turn address-space words (device, thread, ...) into macros.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ss_emu {

// Seconds a thread may wait at a barrier before the emulator gives up: a
// barrier or SIMD collective that some thread never reaches is a kernel bug.
constexpr int kBarrierTimeoutSeconds = 60;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned long gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, std::chrono::seconds(kBarrierTimeoutSeconds),
                                   [&] { return generation_ != gen; });
    if (!done) {
      std::fprintf(stderr,
                   "emulator: barrier timed out: a barrier or SIMD collective is "
                   "not reached by every thread of its group (divergent control flow)\n");
      std::_Exit(3);
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  unsigned long generation_ = 0;
};

// One threadgroup / thread block.
struct Group {
  explicit Group(int simd_groups)
      : barrier(simd_groups * 32), slots(static_cast<size_t>(simd_groups) * 2 * 32) {
    for (int i = 0; i < simd_groups; ++i) {
      simd.emplace_back(new Barrier(32));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> simd;
  std::vector<uint64_t> slots;  // [simd group][parity][lane], raw bits of any scalar
};

// Who the calling OS thread is.
struct Lane {
  Group* group = nullptr;
  int simd_group = 0;
  int lane = 0;
  int parity = 0;
};

inline thread_local Lane self;

// Publish `x` to the SIMD group; return the 32 published values (by lane).
// One barrier per collective is enough with two alternating slot arrays: a
// lane can only overwrite an array after every lane has left the collective
// that last read it.
template <typename V>
inline std::array<V, 32> exchange(V x) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "SIMD collectives take scalars");
  Lane& me = self;
  uint64_t* row = &me.group->slots[static_cast<size_t>(me.simd_group * 2 + me.parity) * 32];
  uint64_t raw = 0;
  std::memcpy(&raw, &x, sizeof(V));
  row[me.lane] = raw;
  me.parity ^= 1;
  me.group->simd[me.simd_group]->wait();
  std::array<V, 32> all;
  for (int i = 0; i < 32; ++i) {
    std::memcpy(&all[i], &row[i], sizeof(V));
  }
  return all;
}

inline int lane_id() { return self.lane; }
inline void simd_wait() { self.group->simd[self.simd_group]->wait(); }
inline void group_wait() { self.group->barrier.wait(); }

// Run every threadgroup of a (groups_x, groups_y) grid with `threads` threads.
// `body(x, y, t)` is one thread: threadgroup (x, y), thread index t.
template <typename F>
inline void launch(unsigned groups_x, unsigned groups_y, unsigned threads, F body) {
  if (threads == 0 || threads % 32 != 0) {
    std::fprintf(stderr, "emulator: threads per group must be a positive multiple of 32\n");
    std::_Exit(2);
  }
  for (unsigned y = 0; y < groups_y; ++y) {
    for (unsigned x = 0; x < groups_x; ++x) {
      Group group(static_cast<int>(threads / 32));
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&group, &body, x, y, t] {
          self = Lane{&group, static_cast<int>(t / 32), static_cast<int>(t % 32), 0};
          body(x, y, t);
        });
      }
      for (auto& th : pool) {
        th.join();
      }
    }
  }
}

// bfloat16 with round-to-nearest-even from float (as MLX and the GPUs do).
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {  // NOLINT: implicit like the GPU types
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace ss_emu
