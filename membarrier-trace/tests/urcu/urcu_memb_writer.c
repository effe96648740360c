/* A real liburcu (urcu-memb flavour) user for membarrier-trace's tests: reader threads in
 * read-side critical sections, and a writer that waits for N grace periods with
 * synchronize_rcu(), which issues membarrier(PRIVATE_EXPEDITED) to the readers' CPUs. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <urcu/urcu-memb.h>

static volatile int stop, registered;
static int *shared;

static void *reader(void *arg)
{
	(void)arg;
	urcu_memb_register_thread();
	registered = 1;
	while (!stop) {
		urcu_memb_read_lock();
		int *p = rcu_dereference(shared);
		if (p && *p < 0)
			abort();
		urcu_memb_read_unlock();
	}
	urcu_memb_unregister_thread();
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
	while (!registered)
		; /* grace periods only wait for registered readers */
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		rcu_assign_pointer(shared, (i & 1) ? &a : &b);
		urcu_memb_synchronize_rcu();
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	stop = 1;
	pthread_join(t, NULL);
	printf("grace periods: %d\n", n);
	/* For cargo xtask bench: the mean time of a grace period, as the writer sees it. */
	printf("ns per grace period: %.0f\n",
	       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (n > 0 ? n : 1));
	return 0;
}
