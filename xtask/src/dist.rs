//! `cargo xtask dist`: the static binary as users get it, in a tarball and a .deb, each checked
//! as it is used: the .deb installed (into a private dpkg root), its man page opened, and the
//! exporter run with only the capabilities its systemd unit grants, scraped for exact counts.

use std::{
    fs,
    io::Read as _,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{STATIC_TARGET, check, output};

/// The systemd unit, shipped in both.
const UNIT: &str = "membarrier-trace-exporter.service";

/// What `dist` made.
pub struct Dist {
    pub tarball: PathBuf,
    pub deb: PathBuf,
}

/// Writes the tarball and the .deb into target/dist from the static build in `bins`.
///
/// Long: the package's files listed one after the other, as the tarball and the .deb hold them.
pub fn dist(root: &Path, bins: &Path) -> Result<Dist> {
    let tracer = bins.join("membarrier-trace");
    ensure_static(&tracer)?;
    // "membarrier-trace 0.1.0 (commit ...)": the binary runs, and says its version.
    let said = output(Command::new(&tracer).arg("--version"))?;
    let version = said
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("--version said `{said}`"))?
        .to_string();
    let out = root.join("target/dist");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let docs = out.join("generated");
    check(Command::new(bins.join("membarrier-trace-docs")).arg(&docs))?;

    let name = format!("membarrier-trace-{version}-{STATIC_TARGET_SHORT}");
    let tree = out.join(&name);
    let completions = tree.join("completions");
    fs::create_dir_all(&completions)?;
    copy(&tracer, &tree.join("membarrier-trace"))?;
    copy(
        &docs.join("membarrier-trace.8"),
        &tree.join("membarrier-trace.8"),
    )?;
    for c in COMPLETIONS {
        copy(&docs.join(c.file), &completions.join(c.file))?;
    }
    for f in ["LICENSE-MIT", "LICENSE-APACHE", "README.md"] {
        copy(&root.join(f), &tree.join(f))?;
    }
    copy(&root.join("packaging").join(UNIT), &tree.join(UNIT))?;
    let tarball = out.join(format!("{name}.tar.gz"));
    check(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&out)
            .arg(&name),
    )?;

    let deb_root = out.join("deb");
    let put = |from: &Path, to: &str| copy(from, &deb_root.join(to));
    put(&tracer, "usr/bin/membarrier-trace")?;
    put(
        &docs.join("membarrier-trace.8"),
        "usr/share/man/man8/membarrier-trace.8",
    )?;
    check(
        Command::new("gzip")
            .args(["-9n"])
            .arg(deb_root.join("usr/share/man/man8/membarrier-trace.8")),
    )?;
    for c in COMPLETIONS {
        put(&docs.join(c.file), c.installed)?;
    }
    put(
        &root.join("packaging").join(UNIT),
        &format!("lib/systemd/system/{UNIT}"),
    )?;
    let doc = deb_root.join("usr/share/doc/membarrier-trace");
    fs::create_dir_all(&doc)?;
    fs::write(doc.join("copyright"), copyright(root)?)?;
    copy(&root.join("README.md"), &doc.join("README.md"))?;
    let control = deb_root.join("DEBIAN/control");
    fs::create_dir_all(control.parent().unwrap())?;
    let size_kib = dir_bytes(&deb_root)?.div_ceil(1024);
    fs::write(
        &control,
        format!(
            "Package: membarrier-trace
Version: {version}
Architecture: amd64
Maintainer: The membarrier-trace developers <membarrier-trace@users.noreply.github.com>
Installed-Size: {size_kib}
Section: admin
Priority: optional
Description: exact per-process accounting of membarrier(2) calls, with eBPF
 Who issues membarrier(2), which commands, how often and how long each takes,
 how long it waits for the grace period and how many CPUs it interrupts:
 exact counts and in-kernel latency per process and cmd, as a report, a live
 dashboard or Prometheus metrics. One static binary; Linux 5.10 or later.
"
        ),
    )?;
    let deb = out.join(format!("membarrier-trace_{version}_amd64.deb"));
    check(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&deb_root)
            .arg(&deb)
            .stdout(Stdio::null()),
    )?;
    eprintln!("xtask: wrote {} and {}", tarball.display(), deb.display());
    Ok(Dist { tarball, deb })
}

/// Architecture and libc in the tarball's name.
const STATIC_TARGET_SHORT: &str = "x86_64-linux-musl";

struct Completion {
    /// As clap_complete names it.
    file: &'static str,
    /// Where Debian's shells look for it.
    installed: &'static str,
}

const COMPLETIONS: &[Completion] = &[
    Completion {
        file: "membarrier-trace.bash",
        installed: "usr/share/bash-completion/completions/membarrier-trace",
    },
    Completion {
        file: "_membarrier-trace",
        installed: "usr/share/zsh/vendor-completions/_membarrier-trace",
    },
    Completion {
        file: "membarrier-trace.fish",
        installed: "usr/share/fish/vendor_completions.d/membarrier-trace.fish",
    },
];

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().context("a file in a folder")?)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}

/// Debian's machine-readable copyright file: both licenses, in full.
fn copyright(root: &Path) -> Result<String> {
    let indent = |text: &str| {
        text.lines()
            .map(|l| {
                if l.trim().is_empty() {
                    " .".to_string()
                } else {
                    format!(" {l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: membarrier-trace

Files: *
Copyright: 2026 The membarrier-trace developers
License: MIT or Apache-2.0

License: MIT
{}

License: Apache-2.0
{}
",
        indent(&fs::read_to_string(root.join("LICENSE-MIT"))?),
        indent(&fs::read_to_string(root.join("LICENSE-APACHE"))?),
    ))
}

/// Fails unless `bin` is a static executable: an ELF with no program interpreter (PT_INTERP),
/// so it needs no loader and no libc of the box it runs on.
pub fn ensure_static(bin: &Path) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    ensure!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2,
        "{} is not a 64-bit ELF",
        bin.display()
    );
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
    for i in 0..usize::from(phnum) {
        let at = phoff + i * phentsize;
        ensure!(
            at + 4 <= elf.len(),
            "{}: truncated program headers",
            bin.display()
        );
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP {
            bail!(
                "{} is dynamically linked (it has a PT_INTERP)",
                bin.display()
            );
        }
    }
    Ok(())
}

/// Checks what `dist` made, as a user meets it: the tarball holds everything; the .deb
/// installs (into a private dpkg root, not this machine's), its binary says its version, its
/// man page opens; and the exporter, run with only its unit's capabilities, serves exact
/// counts.
///
/// Long: a script of checks, each as a user meets it, in order.
pub fn verify(root: &Path, d: &Dist, workload: &Path) -> Result<()> {
    let listing = output(Command::new("tar").arg("-tzf").arg(&d.tarball))?;
    for f in [
        "membarrier-trace",
        "membarrier-trace.8",
        "completions/membarrier-trace.bash",
        "completions/_membarrier-trace",
        "completions/membarrier-trace.fish",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "README.md",
        UNIT,
    ] {
        ensure!(
            listing.lines().any(|l| l.ends_with(&format!("/{f}"))),
            "the tarball has no {f}:\n{listing}"
        );
    }
    let inst = root.join("target/dist/installed");
    let _ = fs::remove_dir_all(&inst);
    let admin = inst.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(d))?;
    }
    fs::write(admin.join("status"), "")?;
    check(
        Command::new("dpkg")
            .arg(format!("--instdir={}", inst.display()))
            .arg(format!("--admindir={}", admin.display()))
            .args(["--force-script-chrootless", "--force-not-root", "-i"])
            .arg(&d.deb)
            .stdout(Stdio::null()),
    )?;
    let listed = output(
        Command::new("dpkg")
            .arg(format!("--admindir={}", admin.display()))
            .args(["-L", "membarrier-trace"]),
    )?;
    for f in [
        "/usr/bin/membarrier-trace",
        "/usr/share/man/man8/membarrier-trace.8.gz",
        "/usr/share/bash-completion/completions/membarrier-trace",
        "/usr/share/zsh/vendor-completions/_membarrier-trace",
        "/usr/share/fish/vendor_completions.d/membarrier-trace.fish",
        "/lib/systemd/system/membarrier-trace-exporter.service",
        "/usr/share/doc/membarrier-trace/copyright",
    ] {
        ensure!(
            listed.lines().any(|l| l == f),
            "the .deb installs no {f}:\n{listed}"
        );
    }
    ensure!(
        !listed.contains("membarrier-workload"),
        "the .deb installs the test workload"
    );
    let bin = inst.join("usr/bin/membarrier-trace");
    let version = output(Command::new(&bin).arg("--version"))?;
    ensure!(
        version.starts_with("membarrier-trace ") && version.contains("(commit "),
        "--version said `{version}`"
    );
    let page = output(
        Command::new("man")
            .arg("-l")
            .arg(inst.join("usr/share/man/man8/membarrier-trace.8.gz"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    )?;
    for needle in [
        "membarrier-trace",
        "calibrate",
        "--listen",
        "EXIT STATUS",
        "usage error",
    ] {
        ensure!(
            page.contains(needle),
            "the man page has no `{needle}`:\n{page}"
        );
    }
    let bash =
        fs::read_to_string(inst.join("usr/share/bash-completion/completions/membarrier-trace"))?;
    ensure!(
        bash.contains("calibrate"),
        "the bash completions leave out calibrate"
    );
    exporter_with_the_units_capabilities(&bin, &root.join("packaging").join(UNIT), workload)?;
    eprintln!(
        "xtask: dist checked: tarball complete, .deb installed ({version}), man page opens, exporter exact with its unit's capabilities"
    );
    Ok(())
}

/// Runs `bin` as the unit runs it (its ExecStart's options), with only the capabilities in its
/// CapabilityBoundingSet (and no new privileges), while a workload makes 1,000 calls; the
/// metrics must say 1,000.
///
/// Long: the unit's ExecStart and capabilities read, the exporter started under them, the
/// workload run, the scrape checked: one scenario.
fn exporter_with_the_units_capabilities(bin: &Path, unit: &Path, workload: &Path) -> Result<()> {
    let unit = fs::read_to_string(unit)?;
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("the unit has no {key}"))
    };
    let caps: Vec<String> = value("CapabilityBoundingSet")?
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let exec: Vec<&str> = value("ExecStart")?.split_whitespace().collect();
    ensure!(
        exec.first() == Some(&"/usr/bin/membarrier-trace"),
        "ExecStart runs {:?}",
        exec.first()
    );
    // Its own options, on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let args: Vec<String> = exec[1..]
        .iter()
        .map(|a| {
            if a.starts_with(':') {
                format!("127.0.0.1:{port}")
            } else {
                a.to_string()
            }
        })
        .collect();
    let set = format!("-all,{}", caps.join(","));
    let mut tracer = Command::new("setpriv")
        .args([
            "--bounding-set",
            &set,
            "--inh-caps",
            "-all",
            "--no-new-privs",
            "--",
        ])
        .arg(bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running setpriv (util-linux)")?;
    let result = (|| {
        // Serving once the programs are attached.
        let start = Instant::now();
        while scrape(port).is_err() {
            if let Some(s) = tracer.try_wait()? {
                let mut err = String::new();
                tracer.stderr.take().unwrap().read_to_string(&mut err)?;
                bail!("with the unit's capabilities ({set}) the exporter exited ({s}): {err}");
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "the exporter never served"
            );
            thread::sleep(Duration::from_millis(100));
        }
        check(
            Command::new(workload)
                .args(["--name", "mt-unit", "--query", "1000"])
                .stdout(Stdio::null()),
        )?;
        let start = Instant::now();
        loop {
            let metrics = scrape(port)?;
            let calls: u64 = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("membarrier_calls_total{")
                        && l.contains("comm=\"mt-unit\"")
                        && l.contains("cmd=\"QUERY\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if calls == 1000 {
                return Ok(());
            }
            ensure!(
                calls < 1000 && start.elapsed() < Duration::from_secs(10),
                "the exporter counted {calls} of the workload's 1,000 calls"
            );
            thread::sleep(Duration::from_millis(200));
        }
    })();
    // SAFETY: kill on our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let _ = tracer.wait();
    let mut err = String::new();
    tracer.stderr.take().unwrap().read_to_string(&mut err)?;
    result?;
    // Everything it attaches to, attached: the RCU writers' uprobes too (liburcu is installed
    // for the tests), nothing refused for want of a capability.
    ensure!(
        err.contains("RCU writers: probing") && !err.contains("Permission denied"),
        "with the unit's capabilities ({set}): {err}"
    );
    Ok(())
}

/// GET /metrics from 127.0.0.1:`port`.
fn scrape(port: u16) -> Result<String> {
    use std::io::Write as _;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    ensure!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    Ok(body)
}

/// Where the static build's binaries are.
pub fn static_bins(root: &Path) -> PathBuf {
    root.join("target").join(STATIC_TARGET).join("release")
}
