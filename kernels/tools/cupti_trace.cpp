// Kernel timeline of any CUDA program, graph replays included, for machines without Nsight
// Systems. A CUPTI injection library: the driver loads it before the program's first CUDA call
// when CUDA_INJECTION64_PATH names it, and it records every kernel's start and end as the GPU
// ran it (CUPTI's concurrent-kernel activity: kernels are not serialised, PDL overlap stays).
// At exit it writes one CSV line a kernel to $DSPARK_TRACE_OUT (default /tmp/kernels.csv).
// tools/chain_trace.py reads that file and says what each kernel adds to a step's chain.
//
// Build (on the GPU machine; KREC is the newest kernel record the header has):
//   INC=$(dirname $(find / -name cupti.h -path '*include*' 2>/dev/null | head -1))
//   KREC=$(grep -o 'CUpti_ActivityKernel[0-9]*;' $INC/cupti_activity.h | sort -V | tail -1 | tr -d ';')
//   g++ -O2 -shared -fPIC -I$INC -I/usr/local/cuda/include -DKREC=$KREC -o /tmp/cupti_trace.so
//       kernels/tools/cupti_trace.cpp -L$(dirname $(find / -name "libcupti.so*" | head -1)) -lcupti
// Run:
//   CUDA_INJECTION64_PATH=/tmp/cupti_trace.so DSPARK_TRACE_OUT=/tmp/k.csv PROGRAM ...
#include <cupti.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif

namespace {

constexpr size_t kBufferBytes = 8u << 20;
FILE* g_out = nullptr;
std::mutex g_out_lock;
std::atomic<unsigned long long> g_dropped{0};

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  // CUPTI wants 8-byte aligned buffers.
  *buffer = static_cast<uint8_t*>(aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> hold(g_out_lock);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
        record->kind != CUPTI_ACTIVITY_KIND_KERNEL)
      continue;
    const auto* k = reinterpret_cast<const KREC*>(record);
    if (g_out)
      fprintf(g_out, "%llu,%llu,%u,%u,%u,%u,%u,%u,%u,%u,%s\n",
              static_cast<unsigned long long>(k->start), static_cast<unsigned long long>(k->end),
              k->streamId, k->correlationId, k->graphId, k->gridX, k->gridY, k->gridZ, k->blockX,
              k->blockY, k->name ? k->name : "?");
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped) == CUPTI_SUCCESS)
    g_dropped += dropped;
  free(buffer);
}

void finish() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> hold(g_out_lock);
  if (g_out) {
    fflush(g_out);
    fclose(g_out);
    g_out = nullptr;
  }
  if (g_dropped.load())
    fprintf(stderr, "cupti_trace: %llu records dropped\n", g_dropped.load());
}

}  // namespace

extern "C" int InitializeInjection(void) {
  const char* path = getenv("DSPARK_TRACE_OUT");
  g_out = fopen(path ? path : "/tmp/kernels.csv", "w");
  if (!g_out) {
    perror("cupti_trace: open");
    return 0;
  }
  fprintf(g_out, "start_ns,end_ns,stream,correlation,graph,grid_x,grid_y,grid_z,block_x,block_y,name\n");
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    fprintf(stderr, "cupti_trace: CUPTI refused the kernel activity\n");
    return 0;
  }
  atexit(finish);
  return 1;
}
