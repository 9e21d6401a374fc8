/* Thread pinning. */
#define _GNU_SOURCE  /* sched_setaffinity, before any system header */
#include <sched.h>

#include "w8a16.h"

/* Binds the calling thread's OpenMP team of n threads: thread i to cpus[i]. libgomp keeps
   a team's threads for the next parallel regions of the same thread, torch's included.
   Returns how many threads could not be bound. */
int w8a16_pin(const int* cpus, int n) {
  int failed = 0;
  #pragma omp parallel num_threads(n) reduction(+:failed)
  {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus[omp_get_thread_num()], &set);
    failed += sched_setaffinity(0, sizeof set, &set) != 0;
  }
  return failed;
}
