/* Two liburcu (urcu-memb) writers for membarrier-trace's tests, built -O2 -fomit-frame-pointer:
 * writer_a() in a thread named "writer-a", then writer_b() in one named "writer-b", each wait for
 * grace periods with urcu_memb_synchronize_rcu() while slow readers sleep inside read-side
 * critical sections. Prints "ready <pid>" and waits for a line on stdin before the first grace
 * period; then, per writer, "<function> <thread name> <tid> <grace periods> <ns>", the ns being
 * its own timing of its synchronize_rcu() calls; then waits for stdin to close (a long-lived
 * writer: its callers are symbolized while it lives).
 *
 * usage: urcu_writers N_A N_B [PAUSE_US]: PAUSE_US between grace periods (default 0). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <urcu/urcu-memb.h>

#define READERS 2

struct writer {
	const char *thread;
	void (*write)(struct writer *);
	int n;
	long long ns;
	pid_t tid;
};

static volatile int stop;
static int pause_us;
static int registered;
static int *shared;
static int values[2] = {1, 2};

static long long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *reader(void *arg)
{
	(void)arg;
	urcu_memb_register_thread();
	__atomic_add_fetch(&registered, 1, __ATOMIC_SEQ_CST);
	while (!stop) {
		urcu_memb_read_lock();
		int *p = rcu_dereference(shared);
		if (p && *p < 0)
			abort();
		usleep(1000); /* a slow reader: grace periods wait for it */
		urcu_memb_read_unlock();
		usleep(100);
	}
	urcu_memb_unregister_thread();
	return NULL;
}

/* Each calls synchronize_rcu itself (not in tail position): its caller address is in here. */
__attribute__((noinline)) void writer_a(struct writer *w)
{
	for (int i = 0; i < w->n; i++) {
		rcu_assign_pointer(shared, &values[i & 1]);
		long long t0 = now_ns();
		urcu_memb_synchronize_rcu();
		w->ns += now_ns() - t0;
		if (pause_us)
			usleep(pause_us);
	}
}

__attribute__((noinline)) void writer_b(struct writer *w)
{
	for (int i = 0; i < w->n; i++) {
		rcu_assign_pointer(shared, &values[(i + 1) & 1]);
		long long t0 = now_ns();
		urcu_memb_synchronize_rcu();
		w->ns += now_ns() - t0;
		if (pause_us)
			usleep(pause_us);
	}
}

static void *run(void *arg)
{
	struct writer *w = arg;
	w->tid = syscall(SYS_gettid);
	pthread_setname_np(pthread_self(), w->thread);
	w->write(w);
	return NULL;
}

int main(int argc, char **argv)
{
	struct writer a = {"writer-a", writer_a, argc > 1 ? atoi(argv[1]) : 100, 0, 0};
	struct writer b = {"writer-b", writer_b, argc > 2 ? atoi(argv[2]) : 100, 0, 0};
	pthread_t readers[READERS], ta, tb;
	char line[16];

	pause_us = argc > 3 ? atoi(argv[3]) : 0;
	shared = &values[0];
	for (int i = 0; i < READERS; i++)
		if (pthread_create(&readers[i], NULL, reader, NULL))
			return 1;
	while (__atomic_load_n(&registered, __ATOMIC_SEQ_CST) < READERS)
		usleep(100);
	printf("ready %d\n", getpid());
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	/* One writer after the other: liburcu lets concurrent synchronize_rcu() callers share one
	 * grace period, the waiters making no membarrier calls of their own. */
	if (pthread_create(&ta, NULL, run, &a))
		return 1;
	pthread_join(ta, NULL);
	if (pthread_create(&tb, NULL, run, &b))
		return 1;
	pthread_join(tb, NULL);
	stop = 1;
	for (int i = 0; i < READERS; i++)
		pthread_join(readers[i], NULL);
	printf("writer_a %s %d %d %lld\n", a.thread, a.tid, a.n, a.ns);
	printf("writer_b %s %d %d %lld\n", b.thread, b.tid, b.n, b.ns);
	fflush(stdout);
	while (fgets(line, sizeof line, stdin))
		;
	return 0;
}
