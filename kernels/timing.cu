// Benchmark helper: holds the stream for `ns` nanoseconds so the launches queued behind it run
// back to back and per-launch events measure GPU time, not host launch latency.
extern "C" __global__ void dsk_spin_ns(unsigned long long ns) {
    dsk_pdl_entry();
    unsigned long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    for (;;) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 >= ns) break;
    }
}
