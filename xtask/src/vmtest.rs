//! `cargo xtask vmtest`: the end-to-end tests inside QEMU guests running stock distribution
//! kernels, in every attach mode, with the results as a table.
//!
//! Each guest boots (TCG: this kind of machine has no usable nested KVM) a kernel fetched from
//! Debian's archive with an initramfs holding busybox, the tracer, the workload and the
//! end-to-end test binary at the paths they were built at. Its init runs the tests once per
//! `--attach` mode and writes libtest's output to a second serial port; the kernel's console goes
//! to the first, kept as a log. The guest is told on its command line what its kernel allows
//! and what it is (`MT_FENTRY`, `MT_PREEMPT_RT`), so the tests assert it instead of accepting
//! either answer.

use std::{
    collections::BTreeMap,
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Build, TEST_ARGS, check, output};

/// Debian packages the guests need.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "debian-archive-keyring",
];

pub struct Kernel {
    /// Short name, for the table and `cargo xtask vmtest NAME`.
    pub name: &'static str,
    /// The Debian release whose archive has it.
    suite: &'static str,
    /// The newest `{package}N{flavour}-unsigned` in that archive (N: the package's ABI number,
    /// or the upstream patch level and Debian's suffix).
    package: &'static str,
    flavour: &'static str,
    /// Whether this kernel lets BPF programs attach with fentry/fexit (checked by hand: Debian's
    /// kernels do) ...
    fentry: bool,
    /// ... and the syscall hook's, which read the syscall's arguments.
    fentry_syscall: bool,
    /// Whether it is a PREEMPT_RT kernel (`--attach auto` takes the tracepoints there).
    preempt_rt: bool,
    /// The modes `cargo xtask test` (and so CI) runs here: those that add coverage; `cargo
    /// xtask vmtest` runs them all.
    test_modes: &'static [&'static str],
    /// Extra kernel command line.
    boot_args: &'static str,
    /// Only this test, in `auto` mode: a guest booted for one test's sake.
    only: Option<&'static str>,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        // Debian 11, and the oldest kernel supported: BPF without compare-and-exchange,
        // attach cookies or task registers (docs/design.md, "Kernels").
        name: "debian11-cloud",
        suite: "bullseye",
        package: "linux-image-5.10.0-",
        flavour: "cloud-amd64",
        fentry: true,
        // Not on the syscall: its verifier refuses the hook's read of __x64_sys_membarrier's
        // argument ("invalid bpf_context access off=0 size=8"), so `auto` takes the
        // tracepoints and `--attach fentry` fails clearly. The breakdown's fentry programs
        // (grace periods, IPIs) attach.
        fentry_syscall: false,
        preempt_rt: false,
        test_modes: MODES,
        boot_args: "",
        only: None,
    },
    Kernel {
        name: "debian12-cloud",
        suite: "bookworm",
        package: "linux-image-6.1.0-",
        flavour: "cloud-amd64",
        fentry: true,
        fentry_syscall: true,
        preempt_rt: false,
        test_modes: MODES,
        boot_args: "",
        only: None,
    },
    Kernel {
        name: "debian12-rt",
        suite: "bookworm",
        package: "linux-image-6.1.0-",
        flavour: "rt-amd64",
        fentry: true,
        fentry_syscall: true,
        preempt_rt: true,
        // The slowest guest (about 2.5 minutes a mode): every fentry program detached waits for
        // RCU-tasks grace periods, which PREEMPT_RT under TCG makes slow. Its fentry mode runs
        // only the accounting tests (see RT_FENTRY_TESTS). `auto` is `tracepoint` here.
        test_modes: &["auto", "fentry"],
        boot_args: "",
        only: None,
    },
    Kernel {
        name: "debian12-nohz",
        suite: "bookworm",
        package: "linux-image-6.1.0-",
        flavour: "cloud-amd64",
        fentry: true,
        fentry_syscall: true,
        preempt_rt: false,
        test_modes: &["auto"],
        // GLOBAL fails with EINVAL once any CPU is nohz_full.
        boot_args: "nohz_full=1",
        only: Some(GLOBAL_UNAVAILABLE),
    },
    Kernel {
        // Debian 13: `auto` (fentry) in the tests; the tracepoint programs are the ones 6.1
        // and the host run.
        name: "debian13-cloud",
        suite: "trixie",
        package: "linux-image-6.12.",
        flavour: "cloud-amd64",
        fentry: true,
        fentry_syscall: true,
        preempt_rt: false,
        test_modes: &["auto"],
        boot_args: "",
        only: None,
    },
];

/// Takes CPUs offline, and needs a nohz_full kernel for half of it: ignored on the host, run
/// in the cloud guest and in the nohz one.
const GLOBAL_UNAVAILABLE: &str = "breakdown::global_unavailable_where_the_kernel_cannot_wait";

const MODES: &[&str] = &["auto", "tracepoint", "fentry"];

/// What `--attach fentry` runs on PREEMPT_RT. There BPF trampolines run their programs with
/// migration disabled but preemptible: a thread preempted inside the hook's program holds it
/// for its CPU, and every other call on that CPU meanwhile has that program skipped (counted
/// in the program's recursion misses). A call with one half skipped is in `missed_calls`, one
/// with both skipped only in `dropped.hook_runs_skipped`: counts are no longer exact (CI once
/// saw 8,461 of 30,000 calls missed), so `auto` takes the tracepoints there, and this mode is
/// checked for its accounting alone: no call counted twice or invented, every one lost within
/// `missed_calls` + `hook_runs_skipped`. The tests that need exact counts show `-` here.
const RT_FENTRY_TESTS: &[&str] = &[
    "counts::pid_filter_counts_exactly_and_ignores_others",
    "counts::command_mode_sees_every_call_and_passes_exit_status",
];

/// Why `test` does not run in `mode` on kernel `k` (None: it runs), in a `cargo xtask test`
/// run (`in_test`) or a `cargo xtask vmtest` one.
fn off(k: &Kernel, mode: &str, test: &str, in_test: bool) -> Option<Off> {
    if let Some(only) = k.only {
        return (mode != "auto" || test != only).then_some(Off::OneTest);
    }
    if mode == "fentry" && !k.fentry_syscall {
        return Some(Off::NoFentry);
    }
    if in_test && !k.test_modes.contains(&mode) {
        return Some(Off::VmtestOnly);
    }
    (k.preempt_rt && mode == "fentry" && !RT_FENTRY_TESTS.contains(&test)).then_some(Off::RtFentry)
}

/// Why a cell of the table is not run; each has a mark and a line under the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Off {
    NoFentry,
    RtFentry,
    OneTest,
    VmtestOnly,
}

impl Off {
    const ALL: [Off; 4] = [Off::NoFentry, Off::RtFentry, Off::OneTest, Off::VmtestOnly];

    fn mark(self) -> &'static str {
        match self {
            Off::NoFentry => "-nofe",
            Off::RtFentry => "-rt",
            Off::OneTest => "-one",
            Off::VmtestOnly => "-vm",
        }
    }

    fn why(self) -> &'static str {
        match self {
            Off::NoFentry => {
                "the kernel refuses fentry on the syscall: `auto` takes the tracepoints there (its own row), and `attach` checks that --attach fentry fails clearly"
            }
            Off::RtFentry => {
                "on PREEMPT_RT, fentry programs are preemptible and counts inexact: only the accounting tests run there (`auto` takes the tracepoints)"
            }
            Off::OneTest => "a guest booted for one test (its kernel command line is the point)",
            Off::VmtestOnly => {
                "left to `cargo xtask vmtest`: the same programs run in another cell of `cargo xtask test` (the tracepoints on 5.10, 6.1 and the host; fentry on 6.1, and on 6.12 in `auto`)"
            }
        }
    }
}

/// The end-to-end tests that run in a guest, with their column in the table. Left out: those
/// that need a compiler and liburcu, tmux, or an unprivileged user (not in the initramfs).
const TESTS: &[(&str, &str)] = &[
    (
        "counts::pid_filter_counts_exactly_and_ignores_others",
        "counts+gp",
    ),
    (
        "counts::command_mode_sees_every_call_and_passes_exit_status",
        "command",
    ),
    (
        "breakdown::ipis_go_to_the_running_sibling_and_not_for_a_lone_thread",
        "ipis",
    ),
    (
        "breakdown::concurrent_expedited_callers_wait_for_the_mutex",
        "mutex",
    ),
    (
        "counts::a_rename_just_before_exit_names_the_process",
        "rename",
    ),
    (
        "counts::renamed_processes_among_a_churn_are_named_as_they_exited",
        "churn-names",
    ),
    (
        "attach::attaching_mid_flight_misses_only_the_calls_under_way",
        "mid-flight",
    ),
    (
        "attach::a_call_under_way_at_attach_is_counted_missed",
        "missed",
    ),
    ("cli::sigint_prints_the_final_summary", "sigint"),
    (
        "stacks::stacks_above_the_rate_are_sampled_and_add_up",
        "stacks",
    ),
    (
        "attach::attach_auto_falls_back_and_fentry_is_clear",
        "attach",
    ),
    (
        "counts::snapshots_on_the_callers_cpu_lose_no_call",
        "snapshots",
    ),
    (
        "attach::hook_floor_attaches_each_hook_and_counts_nothing",
        "floor",
    ),
    (GLOBAL_UNAVAILABLE, "global"),
    (
        "attach::every_program_verifies_with_room_to_spare",
        "verifier",
    ),
];

/// A guest that has not powered off by then has hung.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Which kernels to boot.
pub enum Select<'a> {
    /// Those of `cargo xtask test`.
    Test,
    All,
    Named(&'a str),
}

/// Boots the kernels selected and runs the tests in each; fails unless every test passed in
/// every guest and mode. Nothing is skipped: a kernel that cannot be fetched or a guest that
/// does not come back is a failure, said as such. Two guests run at once: each emulates its
/// CPUs on one host thread (see `boot`), and this machine has two.
pub fn run(root: &Path, build: &Build, select: Select) -> Result<ExitCode> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| match select {
            Select::Test | Select::All => true,
            Select::Named(n) => n == k.name,
        })
        .collect();
    if let (Select::Named(n), true) = (&select, kernels.is_empty()) {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!("no kernel named {n}: one of {}", names.join(", "));
    }
    let in_test = matches!(select, Select::Test);
    let dir = root.join("target/vmtest");
    fs::create_dir_all(&dir)?;
    let initrd = initramfs(root, build, &dir)?;
    let images: Vec<PathBuf> = kernels
        .iter()
        .map(|k| fetch_kernel(k))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    // The longest first, so the two lanes end together.
    let mut queue: Vec<(&Kernel, &PathBuf)> = kernels.iter().copied().zip(&images).collect();
    queue.sort_by_key(|(k, _)| std::cmp::Reverse(guest_weight(k, in_test)));
    let queue = std::sync::Mutex::new(queue.into_iter());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let Some((k, vmlinuz)) = queue.lock().unwrap().next() else {
                        return;
                    };
                    let t = Instant::now();
                    eprintln!("xtask: vmtest: booting {} ({})", k.name, vmlinuz.display());
                    let results = boot(k, vmlinuz, &initrd, &dir, in_test);
                    eprintln!(
                        "xtask: vmtest: {} done in {:.0} s",
                        k.name,
                        t.elapsed().as_secs_f64()
                    );
                    done.lock().unwrap().push((k, results));
                }
            });
        }
    });
    let mut table = Vec::new();
    for (k, results) in done.into_inner().unwrap() {
        table.push((k, results?));
    }
    table.sort_by_key(|(k, _)| KERNELS.iter().position(|x| x.name == k.name));
    let ok = print_table(&table, in_test);
    eprintln!(
        "xtask: vmtest: {} in {:.0} s; guest logs in {}",
        if ok { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// About how long `k`'s guest takes: the modes it runs.
fn guest_weight(k: &Kernel, in_test: bool) -> usize {
    if k.only.is_some() {
        return 0;
    }
    let modes = if in_test {
        k.test_modes.len()
    } else {
        MODES.len()
    };
    modes * 2 + usize::from(k.preempt_rt)
}

/// The modes `k`'s guest runs.
fn modes(k: &Kernel, in_test: bool) -> Vec<&'static str> {
    MODES
        .iter()
        .copied()
        .filter(|m| TESTS.iter().any(|(t, _)| off(k, m, t, in_test).is_none()))
        .collect()
}

/// Where fetched kernels are kept, beside bpf-linker: once per machine.
fn cache_dir() -> Result<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(cargo_home.join("membarrier-trace/kernels"))
}

/// apt-get or apt-cache, reading package lists of `suite` of its own (under the cache), not
/// the machine's: Debian's archive serves every release's kernels, and the machine's sources
/// stay as they are. The release itself (its point releases' kernels), checked against Debian's
/// archive keyring; not its security suite, whose pool this workplace's mirror does not serve
/// for every release (bullseye-security: 404).
fn apt(tool: &str, suite: &str) -> Result<Command> {
    const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let dir = cache_dir()?.join("../apt").join(suite);
    let lists = dir.join("lists");
    let sources = dir.join("sources.list");
    let want = format!("deb [signed-by={KEYRING}] http://deb.debian.org/debian {suite} main\n");
    if fs::read_to_string(&sources).ok().as_deref() != Some(want.as_str()) {
        // Other sources than the lists were read from: read them again.
        let _ = fs::remove_dir_all(&lists);
        fs::create_dir_all(&dir)?;
        fs::write(&sources, &want)?;
    }
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let mut c = Command::new(tool);
    c.arg("-o")
        .arg(format!("Dir::Etc::sourcelist={}", sources.display()))
        .args(["-o", "Dir::Etc::sourceparts=/dev/null"])
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", lists.display()))
        .arg("-o")
        .arg(format!("Dir::Cache={}", dir.join("cache").display()))
        .args(["-o", "APT::Sandbox::User=root"]);
    Ok(c)
}

/// The newest package of `k` in its release's archive, fetched and unpacked once; returns its
/// vmlinuz.
fn fetch_kernel(k: &Kernel) -> Result<PathBuf> {
    let prefix = k.package;
    let suffix = format!("-{}-unsigned", k.flavour);
    let newest = |names: &str| -> Option<String> {
        names
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix) && n.ends_with(&suffix))
            .max_by_key(|n| {
                let n = &n[prefix.len()..];
                let digits = n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len());
                n[..digits].parse::<u32>().unwrap_or(0)
            })
            .map(str::to_string)
    };
    let search = || -> Result<String> {
        output(apt("apt-cache", k.suite)?.args(["search", "--names-only", prefix]))
    };
    let pkg = match newest(&search()?) {
        Some(p) => p,
        None => {
            // The first time: the release's package lists (about 5 s).
            check(apt("apt-get", k.suite)?.args(["update", "-q"]))?;
            newest(&search()?)
                .with_context(|| format!("no {prefix}N{suffix} in Debian {}'s archive", k.suite))?
        }
    };
    let dir = cache_dir()?.join(&pkg);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    eprintln!("xtask: vmtest: fetching {pkg} into {}", dir.display());
    // Beside it (with_extension would cut the name at "5.10").
    let tmp = cache_dir()?.join(format!("{pkg}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    check(
        apt("apt-get", k.suite)?
            .args(["download", "-q", &pkg])
            .current_dir(&tmp),
    )
    .with_context(|| format!("fetching {pkg}"))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {pkg} left no .deb"))?;
    let unpacked = tmp.join("root");
    check(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let image = fs::read_dir(unpacked.join("boot"))?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {pkg}"))?;
    fs::create_dir_all(&dir)?;
    fs::copy(&image, &vmlinuz)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(vmlinuz)
}

/// The end-to-end test binary of the last build (cargo's own account of it).
fn test_binary(build: &Build) -> Result<PathBuf> {
    let out = build
        .cargo()
        .args(TEST_ARGS)
        .args(["--no-run", "--message-format=json", "--test", "trace"])
        .stderr(Stdio::null())
        .output()
        .context("asking cargo for the test binary")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "trace")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo named no executable for tests/trace.rs")
}

/// Copies `from` to the same absolute path under `root`.
fn install(root: &Path, from: &Path) -> Result<()> {
    let to = root.join(from.strip_prefix("/").unwrap_or(from));
    fs::create_dir_all(to.parent().expect("absolute path"))?;
    fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The guest's init: mounts what the tracer needs, runs the tests once per mode, powers off.
/// Nothing is mounted over /tmp: the initramfs is writable already, and a checkout under /tmp
/// has its binaries there.
fn init_script(test_bin: &Path) -> String {
    let tests: Vec<&str> = TESTS.iter().map(|(t, _)| *t).collect();
    format!(
        r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing
out=/dev/ttyS1
# A hang leaves its blocked tasks' stacks in the console log: sysrq-w every 4 minutes.
(while sleep 240; do echo w > /proc/sysrq-trigger; done) &
echo "@@kernel $(uname -r) fentry=$MT_FENTRY preempt_rt=$MT_PREEMPT_RT cpus=$(nproc)" > $out
# The modes this guest runs, from its command line (`+` between them).
modes=$(echo "$MT_MODES" | tr + ' ')
# A guest booted for one test (Kernel::only).
[ -n "$MT_ONLY" ] && modes=auto
for mode in $modes; do
    echo "@@mode $mode" > $out
    tests="{tests}"
    # Exact counts are not to be had from preemptible fentry programs: RT_FENTRY_TESTS.
    [ "$MT_PREEMPT_RT" = yes ] && [ $mode = fentry ] && tests="{rt_fentry}"
    [ -n "$MT_ONLY" ] && tests=$MT_ONLY
    # --include-ignored: the tests that change the machine (CPUs offline) are for guests.
    MT_ATTACH=$mode {bin} --test-threads=1 --include-ignored --exact $tests > $out 2>&1
    echo "@@rc $mode $?" > $out
done
echo "@@done" > $out
sync
poweroff -f
"#,
        bin = test_bin.display(),
        tests = tests.join(" "),
        rt_fentry = RT_FENTRY_TESTS.join(" "),
    )
}

/// Builds the initramfs: busybox, the binaries at the paths the test binary was built with,
/// their libraries, and init.
fn initramfs(root: &Path, build: &Build, dir: &Path) -> Result<PathBuf> {
    let test_bin = test_binary(build)?;
    let release = crate::dist::static_bins(root);
    let bins = [
        test_bin.clone(),
        release.join("membarrier-trace"),
        release.join("membarrier-workload"),
    ];
    let staging = dir.join("initramfs");
    let _ = fs::remove_dir_all(&staging);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(staging.join(d))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    for applet in [
        "sh", "mount", "echo", "sync", "poweroff", "uname", "nproc", "cat", "sleep", "tr",
    ] {
        std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet))?;
    }
    // Static binaries alone, as users get them: no library of this machine goes in.
    for bin in &bins {
        crate::dist::ensure_static(bin)?;
        install(&staging, bin)?;
    }
    let init = staging.join("init");
    fs::write(&init, init_script(&test_bin))?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio.gz");
    check(
        Command::new("sh")
            .arg("-c")
            .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
            .arg(&image)
            .current_dir(&staging),
    )
    .context("packing the initramfs (cpio, gzip)")?;
    Ok(image)
}

/// The result of each test in each mode, from the guest's libtest output.
type Results = BTreeMap<&'static str, BTreeMap<&'static str, Outcome>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    /// The guest never said: it hung, crashed, or the test binary died.
    Missing,
}

/// Boots `k` with the initramfs and collects what its tests said.
///
/// Long: QEMU's command line, then the guest's console read line by line to its results.
fn boot(k: &Kernel, vmlinuz: &Path, initrd: &Path, dir: &Path, in_test: bool) -> Result<Results> {
    let console = dir.join(format!("{}.console.log", k.name));
    let results = dir.join(format!("{}.tests.log", k.name));
    let _ = fs::remove_file(&results);
    let append = format!(
        "console=ttyS0 panic=-1 loglevel=7 MT_FENTRY={} MT_PREEMPT_RT={} MT_MODES={}{} {}",
        match (k.fentry, k.fentry_syscall) {
            (true, true) => "allowed",
            (true, false) => "no-syscall",
            (false, _) => "refused",
        },
        if k.preempt_rt { "yes" } else { "no" },
        modes(k, in_test).join("+"),
        // MT_VMTEST_ONLY=TEST: one test alone, in auto mode (for working on it; the table then
        // shows the others without a result).
        k.only
            .map(str::to_string)
            .or_else(|| env::var("MT_VMTEST_ONLY").ok())
            .map(|t| format!(" MT_ONLY={t}"))
            .unwrap_or_default(),
        // Empty for most: a trailing space on the command line is harmless.
        k.boot_args,
    );
    let mut child = Command::new("qemu-system-x86_64")
        // Single-threaded TCG: with one host thread per vCPU, a vCPU calling membarrier in a
        // tight loop kept running the code as it was before the other vCPU live-patched the
        // syscall's entry for fentry (no calls seen), or hung on the int3 of the patch (soft
        // lockup at __x64_sys_membarrier+0). One thread for both vCPUs sees every patch.
        .args([
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian's qemu-system-x86)")?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = fs::read_to_string(&results).unwrap_or_default();
    match status {
        None => eprintln!(
            "xtask: vmtest: {} did not power off within {} s; see {}",
            k.name,
            GUEST_TIMEOUT.as_secs(),
            console.display()
        ),
        Some(s) if !text.contains("@@done") => eprintln!(
            "xtask: vmtest: {} stopped ({s}) before its tests finished; see {}",
            k.name,
            console.display()
        ),
        Some(_) => {}
    }
    // Show the guest's own words for anything that failed.
    if text.contains("FAILED") || !text.contains("@@done") {
        eprintln!(
            "---- {} ----\n{text}---- end of {} ----",
            results.display(),
            k.name
        );
    }
    Ok(parse(&text))
}

fn parse(text: &str) -> Results {
    let mut results: Results = BTreeMap::new();
    let mut mode: Option<&'static str> = None;
    for line in text.lines() {
        if let Some(m) = line.strip_prefix("@@mode ") {
            mode = MODES.iter().copied().find(|x| *x == m.trim());
            continue;
        }
        let Some(mode) = mode else { continue };
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.split_once(" ... ") else {
            continue;
        };
        if let Some(&(test, _)) = TESTS.iter().find(|(t, _)| *t == name.trim()) {
            let o = if verdict.trim() == "ok" {
                Outcome::Ok
            } else {
                Outcome::Failed
            };
            results.entry(mode).or_default().insert(test, o);
        }
    }
    results
}

/// Prints kernel x mode x test, every cell: a result, or a mark saying why it was not run,
/// explained under the table; true when every cell run passed.
fn print_table(table: &[(&Kernel, Results)], in_test: bool) -> bool {
    let mut all_ok = true;
    let mut marks = Vec::new();
    print!("{:<16} {:<11}", "kernel", "mode");
    for (_, col) in TESTS {
        print!(" {col:<10}");
    }
    println!();
    for (k, results) in table {
        for mode in MODES {
            print!("{:<16} {:<11}", k.name, mode);
            for (test, _) in TESTS {
                if let Some(why) = off(k, mode, test, in_test) {
                    if !marks.contains(&why) {
                        marks.push(why);
                    }
                    print!(" {:<10}", why.mark());
                    continue;
                }
                let o = results
                    .get(mode)
                    .and_then(|r| r.get(test))
                    .copied()
                    .unwrap_or(Outcome::Missing);
                all_ok &= o == Outcome::Ok;
                let cell = match o {
                    Outcome::Ok => "ok",
                    Outcome::Failed => "FAILED",
                    Outcome::Missing => "no result",
                };
                print!(" {cell:<10}");
            }
            println!();
        }
    }
    for why in Off::ALL.iter().filter(|w| marks.contains(w)) {
        println!("{:<5} not run: {}", why.mark(), why.why());
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_output_per_mode() {
        let text = "@@kernel 6.1.0 fentry=allowed cpus=2\n@@mode auto\n\nrunning 2 tests\n\
                    test counts::pid_filter_counts_exactly_and_ignores_others ... ok\n\
                    test breakdown::concurrent_expedited_callers_wait_for_the_mutex ... FAILED\n\
                    @@rc auto 101\n@@mode fentry\n\
                    test cli::sigint_prints_the_final_summary ... ok\n";
        let r = parse(text);
        assert!(r["auto"]["counts::pid_filter_counts_exactly_and_ignores_others"] == Outcome::Ok);
        assert!(
            r["auto"]["breakdown::concurrent_expedited_callers_wait_for_the_mutex"]
                == Outcome::Failed
        );
        assert!(r["fentry"]["cli::sigint_prints_the_final_summary"] == Outcome::Ok);
        assert!(!r.contains_key("tracepoint"));
    }

    #[test]
    fn the_guest_runs_every_test_in_every_mode() {
        let init = init_script(Path::new("/t/trace"));
        for (t, _) in TESTS {
            assert!(init.contains(t));
        }
        assert!(init.contains("for mode in $modes;"));
        let kernel = |name: &str| KERNELS.iter().find(|k| k.name == name).unwrap();
        // On PREEMPT_RT, fentry runs the accounting tests alone; everything else runs all.
        let (cloud, rt) = (kernel("debian12-cloud"), kernel("debian12-rt"));
        assert!(rt.preempt_rt && !cloud.preempt_rt);
        assert!(init.contains(&format!("tests=\"{}\"", RT_FENTRY_TESTS.join(" "))));
        for in_test in [true, false] {
            for (t, _) in TESTS {
                for mode in MODES {
                    assert_eq!(off(cloud, mode, t, in_test), None);
                    assert_eq!(
                        off(kernel("debian11-cloud"), mode, t, in_test).is_none(),
                        *mode != "fentry"
                    );
                }
                assert_eq!(off(rt, "auto", t, in_test), None);
                assert_eq!(
                    off(rt, "fentry", t, in_test).is_none(),
                    RT_FENTRY_TESTS.contains(t),
                    "{t}"
                );
            }
        }
        // `cargo xtask test` leaves out only what another of its cells runs; vmtest runs all.
        assert_eq!(modes(kernel("debian13-cloud"), true), ["auto"]);
        assert_eq!(modes(kernel("debian13-cloud"), false), MODES);
        assert_eq!(modes(rt, true), ["auto", "fentry"]);
        assert!(
            RT_FENTRY_TESTS
                .iter()
                .all(|r| TESTS.iter().any(|(t, _)| t == r))
        );
        // A one-test guest runs that test alone, in auto mode, and it is in the table.
        let nohz = KERNELS.iter().find(|k| k.only.is_some()).unwrap();
        assert!(TESTS.iter().any(|(t, _)| Some(*t) == nohz.only));
        for (t, _) in TESTS {
            for mode in MODES {
                assert_eq!(
                    off(nohz, mode, t, false).is_none(),
                    *mode == "auto" && Some(*t) == nohz.only
                );
            }
        }
        // The binaries sit at their build paths, which may be under /tmp.
        for line in init.lines().filter(|l| l.starts_with("mount ")) {
            assert!(!line.ends_with(" /tmp"), "{line}");
        }
    }
}
