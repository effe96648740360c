/* A real liburcu user for membarrier-trace's tests and bench: a reader thread in read-side
 * critical sections, and a writer in main() that waits for N grace periods with
 * synchronize_rcu() and prints its mean time. The flavour is chosen at build time: memb (the
 * default; its grace periods issue membarrier(PRIVATE_EXPEDITED) to the readers' CPUs), -DQSBR
 * (readers announce quiescent states themselves: no membarrier calls) or -DBP (readers register
 * on their first critical section). */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <time.h>
#if defined(QSBR)
#include <urcu/urcu-qsbr.h>
#define FLAVOUR(f) urcu_qsbr_##f
#elif defined(BP)
#include <urcu/urcu-bp.h>
#define FLAVOUR(f) urcu_bp_##f
#else
#include <urcu/urcu-memb.h>
#define FLAVOUR(f) urcu_memb_##f
#endif

static volatile int stop, reading;
static int *shared;

static void *reader(void *arg)
{
	(void)arg;
#if !defined(BP)
	FLAVOUR(register_thread)();
#endif
	while (!stop) {
		FLAVOUR(read_lock)();
		int *p = rcu_dereference(shared);
		if (p && *p < 0)
			abort();
		FLAVOUR(read_unlock)();
		reading = 1;
#if defined(QSBR)
		urcu_qsbr_quiescent_state();
#endif
	}
#if !defined(BP)
	FLAVOUR(unregister_thread)();
#endif
	return NULL;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 100;
	/* Milliseconds to stay after the last grace period before exiting. */
	int linger_ms = argc > 2 ? atoi(argv[2]) : 0;
	pthread_t t;
	static int a = 1, b = 2;
	struct timespec t0, t1;

	shared = &a;
	if (pthread_create(&t, NULL, reader, NULL))
		return 1;
	while (!reading)
		; /* grace periods only wait for registered readers */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		rcu_assign_pointer(shared, (i & 1) ? &a : &b);
		FLAVOUR(synchronize_rcu)();
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	stop = 1;
	pthread_join(t, NULL);
	printf("grace periods: %d\n", n);
	printf("ns per grace period: %.0f\n",
	       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (n > 0 ? n : 1));
	fflush(stdout);
	usleep(linger_ms * 1000);
	return 0;
}
