//! `cargo xtask`: one entry point that installs what the project needs, then builds, runs or
//! tests it. Every step checks first and installs only what is missing, saying what it does.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

mod bench;
mod dist;
mod soak;
mod vmtest;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests drive: real membarrier users, tools to compare against, and a
/// Prometheus server to scrape the exporter.
const TEST_PACKAGES: &[&str] = &[
    "stress-ng",
    "liburcu-dev",
    "strace",
    "tmux",
    "gcc",
    // readelf, objcopy, strip, addr2line: the independent checks of build IDs and debug files.
    "binutils",
    // A debuginfod server and its client (debuginfod-find), for the test that fetches from one.
    "debuginfod",
    "elfutils",
    // libc's debug file, by build ID under /usr/lib/debug: its local functions named.
    "libc6-dbg",
    "prometheus",
];

const USAGE: &str = "usage: cargo xtask <command>
  bootstrap        install what building and testing need (nightly rust-src, bpf-linker, Debian packages)
  build            build membarrier-trace (release)
  run [-- ARGS]    build, then run membarrier-trace ARGS as root
  test [-- ARGS]   run every test as root (ARGS go to cargo test), a 1-minute soak, then the VM
                   kernel matrix
  soak [MINUTES]   two tracers on a churning box, checked against the workloads' counts (as root;
                   default 10 minutes)
  vmtest [KERNEL]  the end-to-end tests inside QEMU guests on stock kernels, all or one (as root)
  dist             the static binary in target/dist: a tarball and a .deb, each checked
  clippy           cargo clippy -D warnings on every crate
  bench [ROUNDS]   what tracing costs, against the untraced baseline (as root; default 5 rounds)
  bench programs   only the programs' run time (kernel.bpf_stats_enabled): the hook's per run, 5
                   times, each part of the per-call path alone, and every program's per call
                   (MEMBARRIER_TRACE_BENCH_TRACER=PATH measures another build the same way, for
                   a before and after)
  bench recording  only what `record` costs beside the plain tracer, and its bytes an hour
  bench startstop  only the time from start to exit of `-d 0.05 -o json`, and where it goes
  bench dashboard  only the time from typing `membarrier-trace --pid P` to its first figures";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Long: one arm per `cargo xtask` subcommand, each a few calls.
fn run() -> Result<ExitCode> {
    let mut args = env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.skip_while(|a| a == "--").collect();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cmd.as_str() {
        "bootstrap" => {
            toolchain()?;
            packages(TEST_PACKAGES)?;
            Ok(ExitCode::SUCCESS)
        }
        "build" => {
            build(&root)?;
            Ok(ExitCode::SUCCESS)
        }
        "run" => {
            let b = build(&root)?;
            let bin = dist::static_bins(&root).join("membarrier-trace");
            status(as_root(Command::new(bin).args(&rest), &b.path))
        }
        "test" => {
            packages(TEST_PACKAGES)?;
            packages(vmtest::PACKAGES)?;
            let b = build(&root)?;
            eprintln!("xtask: running the tests (as root: they load eBPF programs)");
            let mut cmd = b.cargo();
            cmd.args(TEST_ARGS);
            if !rest.is_empty() {
                cmd.arg("--").args(&rest);
            }
            let code = status(as_root(&mut cmd, &b.path))?;
            if code != ExitCode::SUCCESS || !rest.is_empty() {
                // A filtered run is for one test at hand, not the soak or the matrix.
                return Ok(code);
            }
            let bins = dist::static_bins(&root);
            let made = dist::dist(&root, &bins)?;
            dist::verify(&root, &made, &bins.join("membarrier-workload"))?;
            let code = status(as_root(
                Command::new(env::current_exe()?).args(["soak", "1"]),
                &b.path,
            ))?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            vmtest::run(&root, &b, vmtest::Select::Test)
        }
        "vmtest" => {
            packages(vmtest::PACKAGES)?;
            let b = build(&root)?;
            let select = rest
                .first()
                .map_or(vmtest::Select::All, |k| vmtest::Select::Named(k));
            vmtest::run(&root, &b, select)
        }
        "bench" => {
            // The comparison, the BPF stats, the dashboard's terminal, the liburcu writer.
            packages(&["bpftrace", "bpftool", "tmux", "gcc", "liburcu-dev"])?;
            build(&root)?;
            require_root("the benchmark loads eBPF programs and writes tracefs")?;
            match rest.first().map(String::as_str) {
                Some("programs") => bench::programs(&root)?,
                Some("recording") => bench::recording(&root)?,
                Some("dashboard") => bench::dashboard(&root)?,
                Some("startstop") => bench::start_stop(&root)?,
                rounds => bench::bench(&root, rounds.map(str::parse).transpose()?.unwrap_or(5))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        "soak" => {
            build(&root)?;
            require_root("the soak loads eBPF programs and lowers kernel.pid_max")?;
            let minutes = rest.first().map(|m| m.parse()).transpose()?.unwrap_or(10.0);
            soak::soak(&root, minutes)?;
            Ok(ExitCode::SUCCESS)
        }
        "dist" => {
            build(&root)?;
            let bins = dist::static_bins(&root);
            let made = dist::dist(&root, &bins)?;
            if is_root() {
                dist::verify(&root, &made, &bins.join("membarrier-workload"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        "clippy" => {
            let b = build(&root)?;
            check(b.cargo().args([
                "clippy",
                "--release",
                "--workspace",
                "--exclude",
                "membarrier-trace-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("{USAGE}");
            Ok(ExitCode::from(2))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo_bin() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn status(cmd: &mut Command) -> Result<ExitCode> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    Ok(match s.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c as u8),
        None => ExitCode::FAILURE,
    })
}

fn check(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u == "0")
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("{why}: run it as root");
    }
    Ok(())
}

/// `cmd` with PATH set, run through sudo unless we are root already.
fn as_root<'a>(cmd: &'a mut Command, path: &OsString) -> &'a mut Command {
    cmd.env("PATH", path);
    if !is_root() {
        let prog = cmd.get_program().to_owned();
        let args: Vec<OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env")
            .arg("env")
            .arg(format!("PATH={}", path.to_string_lossy()));
        sudo.arg(prog).args(args);
        *cmd = sudo;
    }
    cmd
}

/// Every binary is built static, for musl: the binary users get (`cargo xtask dist`) is the one
/// the tests, the guests, the soak and the bench run.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// `cargo test` builds every binary and test of the workspace, with the dev-dependencies' features
/// unified in; `build`, `run`, `bench`, `dist` and `vmtest` build the very same, so each finds the
/// others' build done instead of rebuilding with other features.
const TEST_ARGS: &[&str] = &[
    "test",
    "--release",
    "--target",
    STATIC_TARGET,
    "--workspace",
    "--exclude",
    "membarrier-trace-ebpf",
];

/// What a build made: the PATH it ran with (bpf-linker on it), and the eBPF objects (for
/// kernels from 5.12, and before).
pub struct Build {
    pub path: OsString,
    pub ebpf: [PathBuf; 2],
}

impl Build {
    /// cargo with the environment the build used, so nothing is rebuilt for a changed variable.
    fn cargo(&self) -> Command {
        let mut c = Command::new(cargo_bin());
        c.env("PATH", &self.path)
            .env("MEMBARRIER_TRACE_EBPF", &self.ebpf[0])
            .env("MEMBARRIER_TRACE_EBPF_NO_CMPXCHG", &self.ebpf[1]);
        c
    }
}

/// Installs what is missing, builds the eBPF programs, then every binary and test (release).
fn build(root: &Path) -> Result<Build> {
    let path = toolchain()?;
    let ebpf = ebpf(root, &path)?;
    let b = Build { path, ebpf };
    check(b.cargo().args(TEST_ARGS).arg("--no-run"))?;
    Ok(b)
}

/// Builds the eBPF programs, as aya-build would from build.rs but once, shared by every later
/// build, with cargo's progress shown as progress (aya-build relays it as `warning:` lines):
/// into target/bpf, and again with `--cfg no_cmpxchg` into target/bpf-no-cmpxchg for kernels
/// before 5.12, which refuse a program holding a compare-and-exchange or a fetching atomic
/// anywhere, reached or not. Returns both objects' paths, for build.rs
/// (MEMBARRIER_TRACE_EBPF, MEMBARRIER_TRACE_EBPF_NO_CMPXCHG).
fn ebpf(root: &Path, path: &OsString) -> Result<[PathBuf; 2]> {
    const TARGET: &str = "bpfel-unknown-none";
    let build = |dir: &str, cfg: Option<&str>| -> Result<PathBuf> {
        let target_dir = root.join("target").join(dir);
        // The flags aya-build passes: the traced architecture, and BTF for the loader.
        let mut flags = vec![
            format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
            "-Cdebuginfo=2".to_string(),
            "-Clink-arg=--btf".to_string(),
        ];
        flags.extend(cfg.map(|c| format!("--cfg={c}")));
        check(
            Command::new("rustup")
                .args(["run", "nightly", "cargo", "build", "--release", "--bins"])
                .args(["--package", "membarrier-trace-ebpf", "--target", TARGET])
                .args(["-Z", "build-std=core", "--target-dir"])
                .arg(&target_dir)
                .env("PATH", path)
                .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
                // Set by the cargo running xtask: they would pick the stable toolchain.
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO"),
        )?;
        Ok(target_dir.join(TARGET).join("release/membarrier-trace"))
    };
    eprintln!("xtask: building the eBPF programs");
    let new = build("bpf", None)?;
    eprintln!("xtask: building the eBPF programs for kernels before 5.12 (no cmpxchg)");
    let old = build("bpf-no-cmpxchg", Some("no_cmpxchg"))?;
    Ok([new, old])
}

/// Makes sure the eBPF toolchain is there: nightly with rust-src, and bpf-linker built against
/// nightly's own libLLVM (Debian's LLVM is too old to read nightly's bitcode). Returns the PATH
/// to build with.
fn toolchain() -> Result<OsString> {
    let rustup = |args: &[&str]| output(Command::new("rustup").args(args));
    if rustup(&["run", "nightly", "rustc", "--version"]).is_err() {
        eprintln!("xtask: installing the nightly toolchain (for -Z build-std)");
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let sysroot = PathBuf::from(rustup(&["run", "nightly", "rustc", "--print", "sysroot"])?);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: adding rust-src to nightly (the eBPF crate builds core from source)");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let installed = rustup(&["target", "list", "--installed"])?;
    if !installed.lines().any(|t| t == STATIC_TARGET) {
        eprintln!("xtask: adding the {STATIC_TARGET} target (the static binary)");
        check(Command::new("rustup").args(["target", "add", STATIC_TARGET]))?;
    }
    let linker_bin = bpf_linker(&sysroot)?;
    let mut paths = vec![linker_bin];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(env::join_paths(paths)?)
}

/// nightly's libLLVM, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_libllvm(sysroot: &Path) -> Result<String> {
    let lib = sysroot.join("lib");
    let mut names: Vec<String> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM.so."))
        .collect();
    names.sort();
    names
        .pop()
        .with_context(|| format!("no libLLVM.so.* in {}: is nightly complete?", lib.display()))
}

/// The folder holding `bpf-linker`, building it on first use. It lives under CARGO_HOME, keyed
/// by the LLVM it links, so later clones on this machine reuse it and a new nightly rebuilds it.
fn bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let libllvm = nightly_libllvm(sysroot)?;
    let llvm_version = libllvm.trim_start_matches("libLLVM.so.");
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let dir = cargo_home
        .join("membarrier-trace")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-{llvm_version}"));
    let bin = dir.join("bin");
    if output(Command::new(bin.join("bpf-linker")).arg("--version")).is_ok() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's {libllvm} into {} (about 90 s, once)",
        dir.display()
    );
    // bpf-linker's build looks for LLVM_PREFIX/lib/libLLVM.so; the binary then finds the
    // versioned name there at run time, so this folder must stay.
    let prefix = dir.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    let target = sysroot.join("lib").join(&libllvm);
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let major = llvm_version.split('.').next().unwrap_or_default();
    check(
        Command::new(cargo_bin())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&dir)
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(bin)
}

/// Installs the Debian packages that are missing, and only those.
fn packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s != "install ok installed")
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let sudo = |args: &[&str]| {
        let mut c = if is_root() {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        c.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    check(&mut sudo(&["apt-get", "update", "-q"]))?;
    check(&mut sudo(
        &[
            &["apt-get", "install", "-y", "-q", "--no-install-recommends"][..],
            &missing,
        ]
        .concat(),
    ))?;
    Ok(())
}
