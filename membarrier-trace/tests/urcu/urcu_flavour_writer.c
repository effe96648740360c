/* A liburcu user of the qsbr or bp flavour (built with -DQSBR or -DBP), for membarrier-trace's
 * tests: a reader thread, and a writer in main() that waits for N grace periods. qsbr readers
 * announce quiescent states themselves (its grace periods make no membarrier calls); bp readers
 * register on their first read-side critical section. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(QSBR)
#include <urcu/urcu-qsbr.h>
#define FLAVOUR(f) urcu_qsbr_##f
#elif defined(BP)
#include <urcu/urcu-bp.h>
#define FLAVOUR(f) urcu_bp_##f
#else
#error "build with -DQSBR or -DBP"
#endif

static volatile int stop, reading;
static int *shared;

static void *reader(void *arg)
{
	(void)arg;
#if defined(QSBR)
	urcu_qsbr_register_thread();
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
#if defined(QSBR)
	urcu_qsbr_unregister_thread();
#endif
	return NULL;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 100;
	pthread_t t;
	static int a = 1, b = 2;

	shared = &a;
	if (pthread_create(&t, NULL, reader, NULL))
		return 1;
	while (!reading)
		; /* the reader is registered */
	for (int i = 0; i < n; i++) {
		rcu_assign_pointer(shared, (i & 1) ? &a : &b);
		FLAVOUR(synchronize_rcu)();
	}
	stop = 1;
	pthread_join(t, NULL);
	printf("grace periods: %d\n", n);
	return 0;
}
