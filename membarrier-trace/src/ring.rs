//! Ring buffers the kernel fills, each read by a thread of its own that wakes on new items.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use rustix::event::{EventfdFlags, eventfd};

use aya::maps::{MapData, RingBuf};
use membarrier_trace_common::{ExitedThread, MovedProc, exited_kind};

/// A `T` at the start of a ring item, when it is long enough.
pub fn read_as<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: T is plain data written by the kernel; checked long enough; read unaligned.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Threads that each run their `read` (which returns the items it took) whenever their ring
/// has items, when woken ([`Readers::wake`]), and every 100 ms. Dropped, they stop at once
/// (not at their next 100 ms), and are joined.
#[derive(Default)]
pub struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<(JoinHandle<()>, Arc<OwnedFd>)>,
}

impl Readers {
    /// A thread on the ring `fd`; see [`Readers`].
    pub fn spawn(
        &mut self,
        name: &str,
        fd: RawFd,
        read: impl FnMut() -> usize + Send + 'static,
    ) -> std::io::Result<()> {
        self.spawn_paced(name, fd, Duration::ZERO, read)
    }

    /// [`Readers::spawn`], resting `pace` after each read that took items: items that come
    /// faster are taken in batches, not with a wakeup each.
    pub fn spawn_paced(
        &mut self,
        name: &str,
        fd: RawFd,
        pace: Duration,
        mut read: impl FnMut() -> usize + Send + 'static,
    ) -> std::io::Result<()> {
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let (stop, woken) = (self.stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = [fd, woken.as_raw_fd()].map(|fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    // SAFETY: two live pollfds; the ring (and its fd) lives in `read`, the
                    // eventfd in `woken`, until this thread ends.
                    unsafe { libc::poll(pfd.as_mut_ptr(), 2, 100) };
                    if pfd[1].revents != 0 {
                        let _ = rustix::io::read(&*woken, &mut [0u8; 8]);
                    }
                    // Readable with nothing to take: an item reserved but not yet submitted
                    // by a program that was preempted (PREEMPT_RT): let it finish, do not
                    // spin.
                    let took = read();
                    if took == 0 && pfd[0].revents != 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    } else if took > 0 && !pace.is_zero() {
                        std::thread::sleep(pace);
                    }
                }
            })?;
        self.threads.push((thread, wake));
        Ok(())
    }

    /// Wakes every thread now, to run its `read`.
    pub fn wake(&self) {
        for (_, fd) in &self.threads {
            let _ = rustix::io::write(&**fd, &1u64.to_ne_bytes());
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
        for (t, _) in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `EXITED`, the exited processes' rows the kernel moved out at their exit and the exited
/// threads' calls, emptied as they come by a thread of its own. The ring holds about 9,000 processes: at 30,000 exits a second
/// that is 0.3 s, about the retire pass's period, and a burst starves the retire pass of CPU
/// (CI lost 11,900 calls once). The thread is woken by the kernel on the first item after it
/// caught up, and its work is a copy; it then rests 5 ms (a burst's 150 processes), so a burst
/// does not wake it 30,000 times a second.
pub struct ExitedRing {
    shared: Arc<Mutex<Drained>>,
    _reader: Readers,
}

struct Drained {
    ring: RingBuf<MapData>,
    procs: Vec<MovedProc>,
    threads: Vec<ExitedThread>,
}

impl Drained {
    fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            match read_as::<u32>(&item) {
                Some(exited_kind::PROC) => {
                    let mut m = MovedProc::default();
                    let len = item.len().min(size_of::<MovedProc>());
                    // SAFETY: MovedProc is plain data; at most its size is copied from the item
                    // (the kernel sends only the rows in use).
                    unsafe {
                        std::ptr::copy_nonoverlapping(item.as_ptr(), (&raw mut m).cast::<u8>(), len)
                    };
                    self.procs.push(m);
                }
                Some(exited_kind::THREAD) => self.threads.extend(read_as::<ExitedThread>(&item)),
                _ => {}
            }
        }
        n
    }
}

impl ExitedRing {
    pub fn start(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        let fd = ring.as_fd().as_raw_fd();
        let shared = Arc::new(Mutex::new(Drained {
            ring,
            procs: Vec::new(),
            threads: Vec::new(),
        }));
        let s = shared.clone();
        let mut reader = Readers::default();
        reader.spawn_paced("exited", fd, Duration::from_millis(5), move || {
            s.lock().unwrap_or_else(|e| e.into_inner()).drain()
        })?;
        Ok(Self {
            shared,
            _reader: reader,
        })
    }

    /// Every process sent so far, the ring emptied now: one whose record the kernel made
    /// before this call is in it.
    pub fn take(&self) -> Vec<MovedProc> {
        let mut d = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        d.drain();
        std::mem::take(&mut d.procs)
    }

    /// Every exited thread sent so far, the ring emptied now (the processes found on the way
    /// wait for the next [`ExitedRing::take`]).
    pub fn take_threads(&self) -> Vec<ExitedThread> {
        let mut d = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        d.drain();
        std::mem::take(&mut d.threads)
    }
}
