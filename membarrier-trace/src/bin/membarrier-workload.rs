//! A membarrier workload with a known, exact mix of calls, for testing and calibrating
//! membarrier-trace. It times every call itself and prints its own accounting as JSON, so a
//! test can hold the tracer's figures against it.
//!
//! Order of calls: PRIVATE_EXPEDITED before registering (EPERM), QUERY, invalid cmd (EINVAL),
//! bad flags (EINVAL), REGISTER_PRIVATE_EXPEDITED, PRIVATE_EXPEDITED from `--threads` threads,
//! the spinner's calls, GLOBAL, GLOBAL_EXPEDITED, the steady caller, the churn of children and
//! threads (in rounds with `--repeat-secs`), the live threads, the rename, then the benchmark
//! loops. `--victim-secs` makes none of these: the process is an IPI victim instead.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    sync::{Arc, Barrier, Mutex},
    thread,
    time::Instant,
};

use clap::Parser;
use membarrier_trace::{
    model::cmd,
    siblings::{Siblings, pin},
};

#[derive(Parser, Debug)]
struct Args {
    /// PRIVATE_EXPEDITED calls before registering (each fails with EPERM).
    #[arg(long, default_value_t = 0)]
    eperm: u64,
    #[arg(long, default_value_t = 0)]
    query: u64,
    /// Calls with cmd 3, which the kernel does not know (EINVAL).
    #[arg(long, default_value_t = 0)]
    invalid: u64,
    /// PRIVATE_EXPEDITED calls with flags=1, allowed only for RSEQ (EINVAL).
    #[arg(long, default_value_t = 0)]
    bad_flags: u64,
    /// Registered PRIVATE_EXPEDITED calls, split over `--threads` threads named `expedite-N`
    /// (their tids and calls in `expedite_threads`; with 1, from the main thread:
    /// the process stays single-threaded).
    #[arg(long, default_value_t = 0)]
    expedited: u64,
    #[arg(long, default_value_t = 1)]
    threads: u64,
    /// Pin thread `expedite-N` to CPU N modulo the CPUs (two such processes then share each
    /// CPU, one thread of each).
    #[arg(long)]
    pin_threads: bool,
    /// With `--threads` > 1: register after the threads are started (they wait for it), as
    /// the .NET runtime once did: the registration then waits for a grace period.
    #[arg(long)]
    register_late: bool,
    /// GLOBAL calls (a grace period each).
    #[arg(long, default_value_t = 0)]
    global: u64,
    /// GLOBAL_EXPEDITED calls from the main thread, pinned to CPU 0: each IPIs the other CPUs
    /// running a process registered for it (`--victim-secs`).
    #[arg(long, default_value_t = 0)]
    global_expedited: u64,
    /// `--global-expedited` calls at most this many a second (0: back to back), in bursts
    /// every 10 ms.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Be an IPI victim instead: register for GLOBAL_EXPEDITED, print `victim <pid>`, and spin
    /// on the last CPU for this many seconds, making no other call.
    #[arg(long, default_value_t = 0.0)]
    victim_secs: f64,
    /// Pin the main thread to this CPU before the first call.
    #[arg(long)]
    cpu: Option<usize>,
    /// Print `ready <pid>` and wait for a line on stdin before the first call.
    #[arg(long)]
    wait_stdin: bool,
    /// After printing the report, wait for stdin's end before exiting: a tracer following the
    /// process (`--pid`) is still running while its figures are read.
    #[arg(long)]
    hold_stdin: bool,
    /// Registered PRIVATE_EXPEDITED calls from the main thread, pinned to CPU 0, while a sibling
    /// thread spins pinned to the last CPU: each call that finds it running IPIs that CPU.
    #[arg(long, default_value_t = 0)]
    spinner_calls: u64,
    /// Benchmark loops (untimed per call; the total is timed): registered PRIVATE_EXPEDITED
    /// from the main thread, ns per call in `loops.expedited_ns`.
    #[arg(long, default_value_t = 0)]
    loop_expedited: u64,
    /// Registered PRIVATE_EXPEDITED calls from the main thread in bursts of 50, 10 ms apart
    /// (5,000 a second: under `--stacks`'s exact rate), ns per call (the bursts timed) in
    /// `loops.paced_ns`.
    #[arg(long, default_value_t = 0)]
    loop_paced: u64,
    /// Paced calls made first, the same way but not timed: with `--stacks`, the tracer learns
    /// the loop's stack from them (within a retire pass, 250 ms), and the timed calls are the
    /// ones the kernel unwinds.
    #[arg(long, default_value_t = 0)]
    loop_paced_warmup: u64,
    /// getppid() calls: an unrelated cheap syscall, `loops.getppid_ns`.
    #[arg(long, default_value_t = 0)]
    loop_getppid: u64,
    /// Round trips of one byte between two threads over pipes (two context switches each),
    /// `loops.pingpong_ns`.
    #[arg(long, default_value_t = 0)]
    loop_pingpong: u64,
    /// Name the process this (PR_SET_NAME) before any call; its children inherit it.
    #[arg(long)]
    name: Option<String>,
    /// Short-lived child processes, started one after another: each makes one QUERY call and
    /// exits (`children` in the output).
    #[arg(long, default_value_t = 0)]
    fork_children: u64,
    /// `--fork-children` this many at a time: a new child is started as soon as one exits (a
    /// burst of short-lived processes, as a build or a test farm makes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    fork_parallel: u64,
    /// Short-lived threads, started one after another: each makes one QUERY call and exits
    /// (counted with the process's own calls).
    #[arg(long, default_value_t = 0)]
    thread_churn: u64,
    /// Repeat the churn (`--fork-children`, `--thread-churn`) round after round until this many
    /// seconds have passed since the start (at least one round).
    #[arg(long, default_value_t = 0.0)]
    repeat_secs: f64,
    /// Threads alive at once, each making one QUERY call, all exiting once every one has called
    /// (each holds an in-flight slot of the tracer's meanwhile).
    #[arg(long, default_value_t = 0)]
    live_threads: u64,
    /// Registered PRIVATE_EXPEDITED calls from the main thread, back to back, for this many
    /// seconds (a steady caller at full rate).
    #[arg(long, default_value_t = 0.0)]
    steady_secs: f64,
    /// After the other calls, rename the process to this (PR_SET_NAME) and make one QUERY call.
    #[arg(long)]
    rename: Option<String>,
    /// Exit with this status (to test that the tracer passes it on).
    #[arg(long, default_value_t = 0)]
    exit_code: u8,
}

/// What the workload saw for one (cmd, flags, errno).
#[derive(Default, Clone, serde::Serialize)]
struct Outcome {
    cmd: i32,
    flags: u32,
    errno: u32,
    count: u64,
    sum_ns: u64,
    max_ns: u64,
    #[serde(skip)]
    all_ns: Vec<u64>,
    p50_ns: u64,
}

type Tally = BTreeMap<(i32, u32, u32), Outcome>;

/// membarrier(2) as a `syscall` instruction here, not through libc's syscall(): the binary is
/// static musl, whose syscall() has no unwind information, so a stack taken inside it would
/// end there (glibc's has it). Returns the kernel's value: the result, or -errno.
#[inline(always)]
fn sys_membarrier(cmd: i32, flags: u32) -> i64 {
    let r: i64;
    // SAFETY: membarrier takes no pointers; the syscall instruction clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") libc::SYS_membarrier => r,
            in("rdi") i64::from(cmd),
            in("rsi") i64::from(flags),
            in("rdx") 0i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    r
}

fn membarrier(cmd: i32, flags: u32) -> (u32, u64) {
    let t = Instant::now();
    let r = sys_membarrier(cmd, flags);
    let ns = t.elapsed().as_nanos() as u64;
    let errno = if r < 0 { (-r) as u32 } else { 0 };
    (errno, ns)
}

fn call(tally: &mut Tally, n: u64, cmd: i32, flags: u32, keep_all: bool) {
    call_each(tally, n, cmd, flags, keep_all, || {});
}

/// `call`, running `before` ahead of each call.
fn call_each(
    tally: &mut Tally,
    n: u64,
    cmd: i32,
    flags: u32,
    keep_all: bool,
    mut before: impl FnMut(),
) {
    for _ in 0..n {
        before();
        let (errno, ns) = membarrier(cmd, flags);
        let o = tally.entry((cmd, flags, errno)).or_insert_with(|| Outcome {
            cmd,
            flags,
            errno,
            ..Default::default()
        });
        o.count += 1;
        o.sum_ns += ns;
        o.max_ns = o.max_ns.max(ns);
        if keep_all {
            o.all_ns.push(ns);
        }
    }
}

fn merge(into: &mut Tally, from: Tally) {
    for (k, o) in from {
        let e = into.entry(k).or_insert_with(|| Outcome {
            cmd: o.cmd,
            flags: o.flags,
            errno: o.errno,
            ..Default::default()
        });
        e.count += o.count;
        e.sum_ns += o.sum_ns;
        e.max_ns = e.max_ns.max(o.max_ns);
        e.all_ns.extend(o.all_ns);
    }
}

/// Mean ns per run of `f` over `n` runs.
fn timed(n: u64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Mean ns per round trip of a byte between two threads over a pair of pipes.
fn pingpong(n: u64) -> f64 {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe() fills the arrays.
    unsafe {
        assert_eq!(libc::pipe(a.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(b.as_mut_ptr()), 0);
    }
    let (a_r, a_w, b_r, b_w) = (a[0], a[1], b[0], b[1]);
    let echo = thread::spawn(move || {
        let mut byte = 0u8;
        for _ in 0..n {
            unsafe {
                libc::read(a_r, (&raw mut byte).cast(), 1);
                libc::write(b_w, (&raw const byte).cast(), 1);
            }
        }
    });
    let mut byte = 1u8;
    let ns = timed(n, || unsafe {
        libc::write(a_w, (&raw const byte).cast(), 1);
        libc::read(b_r, (&raw mut byte).cast(), 1);
    });
    echo.join().unwrap();
    for fd in [a_r, a_w, b_r, b_w] {
        unsafe { libc::close(fd) };
    }
    ns
}

/// Runs `f` on CPU 0 while a sibling thread spins on the last CPU: SCHED_FIFO, so other tasks
/// do not preempt it (RT throttling still leaves the CPU 5% for the rest), but not on
/// PREEMPT_RT kernels, whose timer and RCU threads run at FIFO 1, which a FIFO spinner starves
/// (RCU stalls, seen on Debian's 6.1-rt). `f` gets [`Siblings::seen_running`], to call before
/// each membarrier call.
fn with_spinner(f: impl FnOnce(&dyn Fn())) {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let preempt_rt = std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1");
    let spinner = Siblings::start(&[cpus - 1], !preempt_rt);
    pin(0);
    f(&|| spinner.seen_running());
}

/// `n` runs of `f`, in bursts of `f(k)` every 10 ms so as to make at most `rate` a second (0:
/// one burst of all).
fn paced(n: u64, rate: u64, mut f: impl FnMut(u64)) {
    if rate == 0 {
        return f(n);
    }
    let burst = (rate / 100).max(1);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let k = burst.min(n - done);
        f(k);
        done += k;
        // The next burst when the rate allows it, not 10 ms after this one ended.
        let due = std::time::Duration::from_secs_f64(done as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
    }
}

/// A process the expedited GLOBAL cmd interrupts: registered for it and always running on the
/// last CPU, so every GLOBAL_EXPEDITED from another CPU IPIs it.
fn victim(secs: f64) {
    let (errno, _) = membarrier(cmd::REGISTER_GLOBAL_EXPEDITED, 0);
    if errno != 0 {
        eprintln!("membarrier-workload: REGISTER_GLOBAL_EXPEDITED failed: errno {errno}");
        std::process::exit(1);
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    pin(cpus - 1);
    println!("victim {}", std::process::id());
    let _ = std::io::stdout().flush();
    let until = Instant::now() + std::time::Duration::from_secs_f64(secs);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// PR_SET_NAME on the calling thread (the main thread names the process).
fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// `n` child processes, each making one QUERY call: one at a time with `parallel` 1, else
/// from `parallel` threads at once, each making its share with `clone(CLONE_VM)` on a stack of
/// its own (no page tables copied: this 2-CPU machine makes about 40,000 processes a second
/// so, 4,000 with fork one at a time). Returns how many exited 0 (a child whose call failed
/// exits 1; one that could not be made is not counted).
fn fork_children(n: u64, parallel: u64) -> u64 {
    fn reaped(pid: libc::pid_t) -> u64 {
        let mut status = 0;
        // SAFETY: waits for the child just made.
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        u64::from(pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
    }
    extern "C" fn child(_: *mut libc::c_void) -> libc::c_int {
        // SAFETY: a raw system call; returning ends the process with its status.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd::QUERY, 0, 0) };
        i32::from(r < 0)
    }
    if parallel == 1 {
        return (0..n)
            .map(|_| {
                // SAFETY: the workload is single-threaded here; the child only makes raw
                // syscalls.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    unsafe { libc::_exit(child(std::ptr::null_mut())) };
                }
                reaped(pid)
            })
            .sum();
    }
    let handles: Vec<_> = (0..parallel)
        .map(|i| {
            let share = n / parallel + u64::from(i < n % parallel);
            thread::spawn(move || {
                let mut stack = vec![0u8; 64 << 10];
                let top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
                (0..share)
                    .map(|_| {
                        // SAFETY: the child runs `child` on this thread's spare stack, which
                        // stays unused until it is reaped below.
                        let pid = unsafe {
                            libc::clone(
                                child,
                                top,
                                libc::CLONE_VM | libc::SIGCHLD,
                                std::ptr::null_mut(),
                            )
                        };
                        reaped(pid)
                    })
                    .sum::<u64>()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// `n` threads alive at once, each making one QUERY call; they exit together once all have.
fn live_threads(n: u64) -> Tally {
    let shared = Arc::new(Mutex::new(Tally::new()));
    let called = Arc::new(Barrier::new(n as usize));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (shared, called) = (Arc::clone(&shared), Arc::clone(&called));
            thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let mut mine = Tally::new();
                    call(&mut mine, 1, cmd::QUERY, 0, false);
                    merge(&mut shared.lock().unwrap(), mine);
                    called.wait();
                })
                .expect("starting a thread")
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    std::mem::take(&mut *shared.lock().unwrap())
}

/// Long: the workload's scenarios one after the other, in the order a run makes them, each a
/// few lines (its calls, then its threads), and the tally printed last; split, each scenario
/// would pass the tally and its half of the arguments around.
fn main() {
    let args = Args::parse();
    let started = Instant::now();
    let pid = std::process::id();
    if let Some(name) = &args.name {
        set_name(name);
    }
    if args.wait_stdin {
        println!("ready {pid}");
        let _ = std::io::stdout().flush();
        let _ = std::io::stdin().lock().read_line(&mut String::new());
    }
    if let Some(cpu) = args.cpu {
        pin(cpu);
    }
    if args.victim_secs > 0.0 {
        victim(args.victim_secs);
        return;
    }
    let mut tally = Tally::new();
    call(&mut tally, args.eperm, cmd::PRIVATE_EXPEDITED, 0, false);
    call(&mut tally, args.query, cmd::QUERY, 0, false);
    call(&mut tally, args.invalid, 3, 0, false);
    call(
        &mut tally,
        args.bad_flags,
        cmd::PRIVATE_EXPEDITED,
        cmd::FLAG_CPU,
        false,
    );
    // The threads of `--expedited` with `--threads` > 1: their tid, name and calls.
    let mut expedite_threads: Vec<serde_json::Value> = Vec::new();
    if args.expedited > 0 && args.threads <= 1 {
        // In the main thread: the process stays single-threaded, and the kernel sends no IPI.
        call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        call(&mut tally, args.expedited, cmd::PRIVATE_EXPEDITED, 0, false);
    } else if args.expedited > 0 {
        if !args.register_late {
            call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        }
        let threads = args.threads;
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Mutex::new(Tally::new()));
        // The threads and the main thread: the threads call once the main thread has
        // registered.
        let start = Arc::new(Barrier::new(threads as usize + 1));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let n = args.expedited / threads + u64::from(i < args.expedited % threads);
                let (shared, start) = (Arc::clone(&shared), Arc::clone(&start));
                let name = format!("expedite-{i}");
                let cpu = args.pin_threads.then_some(i as usize % cpus);
                thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            pin(cpu);
                        }
                        let mut mine = Tally::new();
                        start.wait();
                        call(&mut mine, n, cmd::PRIVATE_EXPEDITED, 0, false);
                        merge(&mut shared.lock().unwrap(), mine);
                        // SAFETY: gettid has no memory effects.
                        let tid = unsafe { libc::gettid() };
                        serde_json::json!({"tid": tid, "name": name, "calls": n})
                    })
                    .unwrap()
            })
            .collect();
        if args.register_late {
            call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        }
        start.wait();
        expedite_threads = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let shared = std::mem::take(&mut *shared.lock().unwrap());
        merge(&mut tally, shared);
    }
    if args.spinner_calls > 0 {
        with_spinner(|seen_running| {
            call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
            call_each(
                &mut tally,
                args.spinner_calls,
                cmd::PRIVATE_EXPEDITED,
                0,
                false,
                seen_running,
            );
        });
    }
    call(&mut tally, args.global, cmd::GLOBAL, 0, true);
    if args.global_expedited > 0 {
        pin(0);
        paced(args.global_expedited, args.rate, |n| {
            call(&mut tally, n, cmd::GLOBAL_EXPEDITED, 0, false)
        });
    }
    if args.steady_secs > 0.0 {
        call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        let until = Instant::now() + std::time::Duration::from_secs_f64(args.steady_secs);
        while Instant::now() < until {
            call(&mut tally, 1000, cmd::PRIVATE_EXPEDITED, 0, false);
        }
    }
    let (mut children, mut threads, mut children_secs) = (0, 0, 0.0);
    loop {
        // Before any thread of ours is started below: fork from a single-threaded process.
        let t = Instant::now();
        children += fork_children(args.fork_children, args.fork_parallel);
        children_secs += t.elapsed().as_secs_f64();
        for _ in 0..args.thread_churn {
            let mut mine = Tally::new();
            mine = thread::spawn(move || {
                call(&mut mine, 1, cmd::QUERY, 0, false);
                mine
            })
            .join()
            .unwrap();
            merge(&mut tally, mine);
        }
        threads += args.thread_churn;
        if started.elapsed().as_secs_f64() >= args.repeat_secs {
            break;
        }
    }
    if args.live_threads > 0 {
        merge(&mut tally, live_threads(args.live_threads));
        threads += args.live_threads;
    }
    if let Some(name) = &args.rename {
        set_name(name);
        call(&mut tally, 1, cmd::QUERY, 0, false);
    }
    let mut loops = serde_json::Map::new();
    if args.loop_expedited > 0 {
        call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        let ns = timed(args.loop_expedited, || {
            sys_membarrier(cmd::PRIVATE_EXPEDITED, 0);
        });
        loops.insert("expedited_ns".into(), ns.into());
    }
    if args.loop_paced > 0 {
        call(&mut tally, 1, cmd::REGISTER_PRIVATE_EXPEDITED, 0, false);
        let (mut left, mut ns) = (args.loop_paced_warmup + args.loop_paced, 0.0);
        while left > 0 {
            let n = left.min(50);
            let burst = n as f64
                * timed(n, || {
                    sys_membarrier(cmd::PRIVATE_EXPEDITED, 0);
                });
            if left <= args.loop_paced {
                ns += burst;
            }
            left -= n;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        loops.insert("paced_ns".into(), (ns / args.loop_paced as f64).into());
    }
    if args.loop_getppid > 0 {
        let ns = timed(args.loop_getppid, || unsafe {
            libc::getppid();
        });
        loops.insert("getppid_ns".into(), ns.into());
    }
    if args.loop_pingpong > 0 {
        loops.insert("pingpong_ns".into(), pingpong(args.loop_pingpong).into());
    }
    let outcomes: Vec<Outcome> = tally
        .into_values()
        .map(|mut o| {
            o.all_ns.sort_unstable();
            if !o.all_ns.is_empty() {
                o.p50_ns = o.all_ns[o.all_ns.len().div_ceil(2) - 1];
            }
            o
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "pid": pid,
            "outcomes": outcomes,
            "loops": loops,
            "children": children,
            "children_secs": children_secs,
            "threads": threads,
            "expedite_threads": expedite_threads,
        })
    );
    if args.hold_stdin {
        let _ = std::io::stdout().flush();
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    }
    std::process::exit(args.exit_code.into());
}
