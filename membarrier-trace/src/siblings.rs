//! Threads spinning on other CPUs, so that an expedited barrier has CPUs running the caller's
//! process to interrupt: `calibrate`'s scenarios and the test workload's spinner.

use std::{
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One spinning thread per CPU given; stopped and joined on drop.
pub struct Siblings {
    stop: Arc<AtomicBool>,
    /// Each one's loop count: moving means running.
    laps: Arc<Vec<AtomicU64>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Siblings {
    /// Starts a thread pinned to each of `cpus` (SCHED_FIFO 1 when `fifo` and allowed), and
    /// returns once all spin. Each gives up after a minute whatever happens, so none is left
    /// spinning (a real-time one would starve its CPU for good).
    pub fn start(cpus: &[usize], fifo: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let laps: Arc<Vec<AtomicU64>> = Arc::new(cpus.iter().map(|_| AtomicU64::new(0)).collect());
        let started = Arc::new(Barrier::new(cpus.len() + 1));
        let threads = cpus
            .iter()
            .enumerate()
            .map(|(i, &cpu)| {
                let (stop, laps, started) = (stop.clone(), laps.clone(), started.clone());
                thread::spawn(move || {
                    pin(cpu);
                    if fifo {
                        // Failure (not root) just leaves it SCHED_OTHER.
                        let _ = crate::preflight::set_scheduler(libc::SCHED_FIFO, 1);
                    }
                    started.wait();
                    let give_up = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Relaxed) && Instant::now() < give_up {
                        for _ in 0..50 {
                            std::hint::spin_loop();
                        }
                        laps[i].fetch_add(1, Relaxed);
                    }
                })
            })
            .collect();
        started.wait();
        Self {
            stop,
            laps,
            threads,
        }
    }

    /// Returns once each sibling has been seen running (or has given up). A barrier issued
    /// while one is off its CPU (RT throttling takes a FIFO one off for 50 ms a second)
    /// interrupts fewer CPUs and returns at once, so calls made back to back crowd into those
    /// windows: a TCG guest once made 4,083 of 5,000 there.
    pub fn seen_running(&self) {
        for (lap, t) in self.laps.iter().zip(&self.threads) {
            let at = lap.load(Relaxed);
            while lap.load(Relaxed) == at && !t.is_finished() {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for Siblings {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
