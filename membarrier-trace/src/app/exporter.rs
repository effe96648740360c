//! `--listen`: serves `/metrics` to Prometheus. A thread takes the connections; each scrape is
//! answered by the tracing loop (which owns the collector) at its next tick, from a fresh
//! snapshot, so a scrape costs one snapshot and nothing runs between scrapes.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc::{Receiver, SyncSender, sync_channel},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    model::{Model, Snapshot, findings},
    render::prometheus::{self, By, Exposition, SelfStats},
};

/// A scrape waiting for the tracing loop.
struct Scrape {
    exposition: Exposition,
    reply: SyncSender<Vec<u8>>,
}

pub struct Exporter {
    requests: Receiver<Scrape>,
    /// Its own model: its reports must not move the window of the text or dashboard output.
    model: Model,
    by: By,
    keep_exited: Duration,
    /// When each (pid, serial) was first seen exited.
    exited_at: HashMap<(u32, u32), Instant>,
    addr: SocketAddr,
}

/// How long a scrape waits for the tracing loop (which ticks every 50 ms) before giving up.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A client that has not sent its request (or taken the answer) by then is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read: a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

impl Exporter {
    /// Binds `addr` and starts taking connections.
    pub fn bind(addr: &str, by: By, keep_exited: Duration) -> Result<Self> {
        let listener = match addr.strip_prefix(':') {
            // Every address: IPv6's, which takes IPv4 too (unless net.ipv6.bindv6only), else
            // IPv4's where the box has no IPv6.
            Some(port) => TcpListener::bind(format!("[::]:{port}"))
                .or_else(|_| TcpListener::bind(format!("0.0.0.0:{port}"))),
            None => TcpListener::bind(addr),
        }
        .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        let (tx, rx) = sync_channel(16);
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    // One at a time: a scrape every few seconds needs no more, and a client
                    // that stalls is cut off by the timeouts.
                    let _ = answer(stream, &tx);
                }
            })?;
        Ok(Self {
            requests: rx,
            model: Model::default(),
            by,
            keep_exited,
            exited_at: HashMap::new(),
            addr: local,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the scrapes waiting, from one snapshot taken only if there are any.
    pub fn serve(&mut self, snapshot: impl FnOnce() -> Result<Snapshot>) -> Result<()> {
        let waiting: Vec<Scrape> = self.requests.try_iter().collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let report = findings::judged(self.model.report(&snapshot()?));
        let now = Instant::now();
        let exited_at = &mut self.exited_at;
        exited_at.retain(|k, _| {
            report
                .processes
                .iter()
                .any(|p| p.exited && (p.pid, p.serial) == *k)
        });
        let (shown, hidden): (Vec<_>, Vec<_>) = report.processes.iter().partition(|p| {
            if !p.exited || self.by == By::Comm {
                return true;
            }
            let at = *exited_at.entry((p.pid, p.serial)).or_insert(now);
            now.duration_since(at) < self.keep_exited
        });
        // Grace periods of processes no longer shown leave with them.
        let hidden: std::collections::HashSet<(u32, u32)> =
            hidden.iter().map(|p| (p.pid, p.serial)).collect();
        let writers: Vec<_> = report
            .rcu_writers
            .iter()
            .filter(|w| !hidden.contains(&(w.pid, w.serial)))
            .collect();
        let me = self_stats();
        for s in waiting {
            let text = prometheus::render(&report, &shown, &writers, self.by, s.exposition, &me);
            let _ = s.reply.send(text);
        }
        Ok(())
    }
}

/// Reads one request and answers it: `/metrics` through the tracing loop, `/` with a pointer
/// to it, anything else 404.
///
/// Long: one request's parse, its one answer by path, and the reply, in the order they happen.
fn answer(mut stream: TcpStream, loop_: &SyncSender<Scrape>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_default()
    };
    let accept = header("accept");
    // Prometheus asks for gzip: a scrape of 100 processes shrinks about tenfold.
    let gzip_ok = header("accept-encoding")
        .split(',')
        .any(|e| e.split(';').next().is_some_and(|e| e.trim() == "gzip"));
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            // Prometheus lists what it takes, best first; with native histograms on, protobuf.
            let exposition = if accept.contains("application/vnd.google.protobuf") {
                Exposition::Protobuf
            } else if accept.contains("application/openmetrics-text") {
                Exposition::OpenMetrics
            } else {
                Exposition::Text
            };
            let (tx, rx) = sync_channel(1);
            let sent = loop_.try_send(Scrape {
                exposition,
                reply: tx,
            });
            match sent.ok().and_then(|()| rx.recv_timeout(ANSWER_WITHIN).ok()) {
                Some(body) => (
                    "200 OK",
                    match exposition {
                        Exposition::Protobuf => {
                            "application/vnd.google.protobuf; \
                             proto=io.prometheus.client.MetricFamily; encoding=delimited"
                        }
                        Exposition::OpenMetrics => {
                            "application/openmetrics-text; version=1.0.0; charset=utf-8"
                        }
                        Exposition::Text => "text/plain; version=0.0.4; charset=utf-8",
                    },
                    body,
                ),
                None => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    "membarrier-trace is not answering (stopping, or busy)\n".into(),
                ),
            }
        }
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "membarrier-trace: metrics at /metrics\n".into(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".into(),
        ),
    };
    let (body, encoding) = if gzip_ok && status.starts_with("200") && path == "/metrics" {
        (gzip(&body), "Content-Encoding: gzip\r\n")
    } else {
        (body, "")
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n{encoding}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(&body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

/// The tracer's own resources, from /proc/self (as the Prometheus client libraries read them).
fn self_stats() -> SelfStats {
    let tick = rustix::param::clock_ticks_per_second().max(1) as f64;
    let page = rustix::param::page_size() as u64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the name's closing parenthesis (a name may hold spaces), from the
    // state (field 3): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    SelfStats {
        cpu_seconds: (field(14) + field(15)) as f64 / tick,
        resident_bytes: field(24) * page,
        virtual_bytes: field(23),
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        max_fds: nofile.current.unwrap_or(0),
        start_time_seconds: boot as f64 + field(22) as f64 / tick,
    }
}

/// `body` gzipped (RFC 1952): the header, the deflate stream, its CRC-32 and length.
fn gzip(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    out.extend(miniz_oxide::deflate::compress_to_vec(body, 6));
    out.extend(crate::store::frame::crc32(body).to_le_bytes());
    out.extend((body.len() as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `gzip` makes, gzip(1) reads back whole; the CRC of "123456789" is the standard
    /// check value.
    #[test]
    fn gzip_is_what_gzip_reads() {
        let text: String = (0..5000)
            .map(|i| format!("membarrier_calls_total{{pid=\"{i}\"}} {}\n", i * 7))
            .collect();
        let mut child = std::process::Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let packed = gzip(text.as_bytes());
        assert!(
            packed.len() * 5 < text.len(),
            "{} of {}",
            packed.len(),
            text.len()
        );
        child.stdin.take().unwrap().write_all(&packed).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
    }

    #[test]
    fn its_own_resources_are_read() {
        let me = self_stats();
        assert!(me.resident_bytes > 1 << 20, "{me:?}");
        assert!(me.open_fds >= 3 && me.max_fds >= me.open_fds, "{me:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            me.start_time_seconds > now - 3600.0 && me.start_time_seconds <= now + 1.0,
            "{me:?}"
        );
    }
}
