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
    model::{Model, Snapshot},
    render::prometheus::{self, By},
};

/// A scrape waiting for the tracing loop.
struct Scrape {
    openmetrics: bool,
    reply: SyncSender<String>,
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
        let report = self.model.report(&snapshot()?);
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
        for s in waiting {
            let text = prometheus::render(&report, &shown, &writers, self.by, s.openmetrics);
            let _ = s.reply.send(text);
        }
        Ok(())
    }
}

/// Reads one request and answers it: `/metrics` through the tracing loop, `/` with a pointer
/// to it, anything else 404.
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
    let accept = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let openmetrics = accept.contains("application/openmetrics-text");
            let (tx, rx) = sync_channel(1);
            let sent = loop_.try_send(Scrape {
                openmetrics,
                reply: tx,
            });
            match sent.ok().and_then(|()| rx.recv_timeout(ANSWER_WITHIN).ok()) {
                Some(text) if openmetrics => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Some(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
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
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}
