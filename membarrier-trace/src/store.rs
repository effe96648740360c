//! Recordings (`membarrier-trace record`): a run's snapshots kept in a file, to be reported,
//! drawn and replayed later, elsewhere. The file is a header, then one entry per interval
//! holding what changed since the one before ([`delta`]), each in a frame of its own
//! ([`frame`]); the last entry, when the run ended cleanly, is the final snapshot.

pub mod delta;
pub mod frame;

use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::Snapshot;
use delta::{Interval, Keyed};

/// The entries' encoding: a reader refuses a recording of a later one.
pub const FORMAT: u32 = 1;

/// What a recording says about its run, once, first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The tracer's version (`--version`).
    pub version: String,
    pub hostname: String,
    pub kernel: String,
    /// The hook attached, as the run's first line says it.
    pub attach: String,
    /// Time between entries (`-i`).
    pub interval_ns: u64,
    /// The wall-clock time tracing started: ns since the Unix epoch.
    pub started_unix_ns: u64,
    /// The tracer's command line.
    pub args: Vec<String>,
    /// The CPUs and nohz_full list the findings are judged by.
    pub machine: crate::model::findings::Machine,
}

#[derive(Debug, Serialize, Deserialize)]
enum Entry {
    Header(Header),
    /// One interval; `last`: the final snapshot, taken when tracing stopped.
    Interval {
        last: bool,
        change: Box<Interval>,
    },
}

/// A recording being written.
pub struct Recorder {
    file: File,
    path: PathBuf,
    before: Keyed,
    pub intervals: u64,
    pub bytes: u64,
    begun: bool,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.begun {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Recorder {
    /// Creates `path` (never an existing file or a link: `O_EXCL`; mode 0600, as perf's).
    /// Nothing is in it until [`Recorder::begin`]; without that, it is removed when dropped
    /// (the run failed before tracing).
    pub fn create(path: &Path) -> Result<Recorder> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                    "{} exists: a recording is never written over an existing file; give a new name",
                    path.display()
                ),
                _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
            })?;
        Ok(Recorder {
            file,
            path: path.to_path_buf(),
            before: Keyed::default(),
            intervals: 0,
            bytes: 0,
            begun: false,
        })
    }

    /// Writes the header: tracing has started.
    pub fn begin(&mut self, header: &Header) -> Result<()> {
        self.file
            .write_all(frame::MAGIC)
            .map_err(|e| self.failed(e))?;
        self.bytes = frame::MAGIC.len() as u64;
        self.begun = true;
        self.entry(&Entry::Header(header.clone()))
    }

    /// Writes the change from the snapshot written before; `last` marks the final one.
    pub fn write(&mut self, snap: &Snapshot, last: bool) -> Result<()> {
        let now = Keyed::of(snap);
        let change = Interval::between(&self.before, &now);
        self.entry(&Entry::Interval {
            last,
            change: Box::new(change),
        })?;
        self.before = now;
        self.intervals += 1;
        Ok(())
    }

    fn entry(&mut self, e: &Entry) -> Result<()> {
        let data = postcard::to_stdvec(e).context("encoding a recording entry")?;
        let n = frame::write_frame(&mut self.file, &data).map_err(|e| self.failed(e))?;
        self.bytes += n as u64;
        Ok(())
    }

    fn failed(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::Error::new(e).context(format!(
            "writing the recording {} (it holds {} whole intervals, {} bytes)",
            self.path.display(),
            self.intervals,
            self.bytes
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A recording read back.
pub struct Recording {
    pub header: Header,
    /// Each interval's change, in order.
    pub intervals: Vec<Interval>,
    /// Its last entry is the final snapshot (the run ended cleanly).
    pub finished: bool,
    /// Bytes after the last whole entry (a run cut off while writing one).
    pub torn_bytes: usize,
    /// Entries whole by their CRC that did not decode (damage), and all after them.
    pub unreadable: usize,
}

impl Recording {
    pub fn open(path: &Path) -> Result<Recording> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Recording> {
        let Some(rest) = bytes.strip_prefix(frame::MAGIC) else {
            bail!("not a membarrier-trace recording (made by `membarrier-trace record FILE`)");
        };
        let (frames, torn_bytes) = frame::read_frames(rest);
        let mut entries = frames.iter().map(|f| postcard::from_bytes::<Entry>(f));
        let header = match entries.next() {
            Some(Ok(Entry::Header(h))) if h.format <= FORMAT => h,
            Some(Ok(Entry::Header(h))) => bail!(
                "recorded by a later membarrier-trace ({}, format {}); this one reads format {FORMAT}",
                h.version,
                h.format
            ),
            _ => bail!("the recording has no readable header: it was cut off at its start"),
        };
        let mut intervals = Vec::new();
        let mut finished = false;
        let mut unreadable = 0;
        for (i, e) in entries.enumerate() {
            match e {
                Ok(Entry::Interval { last, change }) => {
                    finished = last;
                    intervals.push(*change);
                }
                // A frame whole by its CRC but not an entry: damage; keep what came before.
                _ => {
                    unreadable = frames.len() - 1 - i;
                    break;
                }
            }
        }
        Ok(Recording {
            header,
            intervals,
            finished,
            torn_bytes,
            unreadable,
        })
    }

    /// The state after interval `i` (None for before the first).
    pub fn state_at(&self, i: Option<usize>) -> Keyed {
        let mut state = Keyed::default();
        let n = i.map_or(0, |i| (i + 1).min(self.intervals.len()));
        for change in &self.intervals[..n] {
            change.apply_to(&mut state);
        }
        state
    }

    /// The interval a time falls in: the last one ending at or before it (None: before the
    /// first).
    pub fn interval_at(&self, when: When) -> Option<usize> {
        self.intervals.iter().rposition(|c| match when {
            When::Secs(_) => c.head.elapsed_ns <= when.elapsed_ns(0),
            // To the millisecond, as the outputs print times: a time copied from a report is
            // that report's interval.
            When::Wall(ns) => c.head.unix_ns / 1_000_000 <= ns / 1_000_000,
        })
    }

    /// A snapshot of `state` with this recording's machine.
    pub fn snapshot(&self, state: &Keyed) -> Snapshot {
        state.snapshot(&self.header.hostname, &self.header.kernel)
    }

    /// What a reader should be told about how the recording ends, if anything.
    pub fn note(&self) -> Option<String> {
        if self.finished && self.torn_bytes == 0 && self.unreadable == 0 {
            return None;
        }
        let end = self.intervals.last().map_or("its start".to_string(), |c| {
            format!("{:.1} s", c.head.elapsed_ns as f64 / 1e9)
        });
        Some(format!(
            "the recording was cut off (the tracer killed, the disk full, or a crash): it holds {} whole intervals, to {end}{}",
            self.intervals.len(),
            match (self.torn_bytes, self.unreadable) {
                (0, 0) => String::new(),
                (n, 0) => format!("; {n} bytes after them are not a whole entry"),
                (_, n) => format!("; {n} entries after them do not decode"),
            }
        ))
    }
}

/// A recording's states at any interval without adding up every change from the start: one
/// state kept every [`Keyframes::EVERY`] intervals (`replay` moves back and forth).
pub struct Keyframes {
    /// `states[k]`: the state after the first `k * EVERY` intervals.
    states: Vec<Keyed>,
}

impl Keyframes {
    const EVERY: usize = 64;

    pub fn of(rec: &Recording) -> Keyframes {
        let mut states = vec![Keyed::default()];
        let mut state = Keyed::default();
        for (i, change) in rec.intervals.iter().enumerate() {
            change.apply_to(&mut state);
            if (i + 1) % Self::EVERY == 0 {
                states.push(state.clone());
            }
        }
        Keyframes { states }
    }

    /// The state after interval `i`.
    pub fn state(&self, rec: &Recording, i: usize) -> Keyed {
        let i = i.min(rec.intervals.len().saturating_sub(1));
        let k = ((i + 1) / Self::EVERY).min(self.states.len() - 1);
        let mut state = self.states[k].clone();
        for change in rec.intervals.iter().take(i + 1).skip(k * Self::EVERY) {
            change.apply_to(&mut state);
        }
        state
    }
}

/// A time in a recording (`--from`, `--to`): seconds from the start of tracing, or a
/// wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    Secs(f64),
    /// ns since the Unix epoch.
    Wall(u64),
}

impl When {
    /// `12.5` (seconds from the start), or RFC 3339: `2026-12-06T02:30:00Z`, with a fraction
    /// or an offset (`+01:00`) if wanted.
    pub fn parse(s: &str) -> Result<When, String> {
        if let Ok(secs) = s.parse::<f64>() {
            return if secs.is_finite() && secs >= 0.0 {
                Ok(When::Secs(secs))
            } else {
                Err(format!("`{s}`: seconds from the start are 0 or more"))
            };
        }
        parse_rfc3339(s).map(When::Wall).ok_or_else(|| {
            format!("`{s}` is neither seconds from the start (12.5) nor a time like 2026-12-06T02:30:00Z")
        })
    }

    /// As ns from the start of tracing, for a run that started at `started_unix_ns`.
    pub fn elapsed_ns(self, started_unix_ns: u64) -> u64 {
        match self {
            When::Secs(s) => (s * 1e9) as u64,
            When::Wall(ns) => ns.saturating_sub(started_unix_ns),
        }
    }
}

/// RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`, `T` or a space) as ns since the
/// epoch; None if it is not one, or before 1970.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac_ns = 0i64;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &f[..digits.min(9)]);
        frac_ns = padded.parse().ok()?;
        rest = &f[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let (oh, om) = (
                rest[1..3].parse::<i64>().ok()?,
                rest[4..6].parse::<i64>().ok()?,
            );
            (oh * 3600 + om * 60) * if *sign == b'+' { 1 } else { -1 }
        }
        _ => return None,
    };
    // Days since 1970-01-01 from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| s * 1_000_000_000 + frac_ns as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wall-clock times back from what the outputs print (model::rfc3339), offsets and
    /// fractions too; bad ones refused.
    #[test]
    fn times_parse() {
        for ns in [0, 1_709_210_096_789_000_000, 4_133_980_799_999_000_000] {
            let text = crate::model::rfc3339(ns);
            assert_eq!(When::parse(&text), Ok(When::Wall(ns)), "{text}");
        }
        assert_eq!(
            When::parse("2026-12-06T03:30:00.5+01:00"),
            When::parse("2026-12-06T02:30:00.500Z")
        );
        assert_eq!(When::parse("12.5"), Ok(When::Secs(12.5)));
        for bad in [
            "-1",
            "nan",
            "2026-13-01T00:00:00Z",
            "2026-12-06T02:30:00",
            "yesterday",
            "",
        ] {
            assert!(When::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            When::Wall(5_000_000_000).elapsed_ns(2_000_000_000),
            3_000_000_000
        );
    }

    /// Snapshots through changes and back: each state equals the snapshot it came from.
    #[test]
    fn changes_add_up_to_each_snapshot() {
        let mut a = crate::model::tests::snapshot();
        a.hostname = "h".into();
        a.kernel = "k".into();
        let mut b = a.clone();
        b.elapsed_ns += 1_000_000_000;
        b.rows[0].count += 2;
        b.rows[0].hist.record(450);
        b.rows[0].hist.record(90_000);
        b.rows[0].max_ns = 90_000;
        b.rows.remove(3);
        b.comms.insert((9, 1), "new".into());
        let mut state = Keyed::default();
        for s in [&a, &b] {
            let before = state.clone();
            Interval::between(&before, &Keyed::of(s)).apply_to(&mut state);
            let mut back = state.snapshot("h", "k");
            let mut want = s.clone();
            back.rows.sort_by_key(|r| r.key);
            want.rows.sort_by_key(|r| r.key);
            assert_eq!(back.rows, want.rows);
            assert_eq!(back.comms, want.comms);
            assert_eq!(back.losses, want.losses);
            assert_eq!(
                (back.elapsed_ns, &back.hostname),
                (want.elapsed_ns, &want.hostname)
            );
        }
        // The window between them holds the two calls, its max the new one.
        let w = delta::window(&Keyed::of(&a), &Keyed::of(&b)).snapshot("h", "k");
        assert_eq!(w.rows.len(), 1);
        assert_eq!((w.rows[0].count, w.rows[0].max_ns), (2, 90_000));
        assert_eq!(w.elapsed_ns, 1_000_000_000);
    }
}
