use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

/// Set by `cargo xtask` to the eBPF object it built (once, into target/bpf, with its progress
/// shown as such): then this script only points the collector at it ...
const PREBUILT: &str = "MEMBARRIER_TRACE_EBPF";
/// ... and at the one built for kernels before 5.12 (`--cfg no_cmpxchg`).
const PREBUILT_NO_CMPXCHG: &str = "MEMBARRIER_TRACE_EBPF_NO_CMPXCHG";

/// `--version`'s commit: `MEMBARRIER_TRACE_COMMIT` if set (a build from a source tarball),
/// else git's HEAD, else "unknown".
fn commit() {
    println!("cargo:rerun-if-env-changed=MEMBARRIER_TRACE_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let commit = env::var("MEMBARRIER_TRACE_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuilt when HEAD moves: HEAD itself (a checkout) and the branch it names (a commit).
    for file in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rustc-env=MEMBARRIER_TRACE_COMMIT={commit}");
}

fn main() -> anyhow::Result<()> {
    commit();
    println!("cargo:rerun-if-env-changed={PREBUILT}");
    println!("cargo:rerun-if-env-changed={PREBUILT_NO_CMPXCHG}");
    if let Some(obj) = env::var_os(PREBUILT) {
        // Without the second, kernels before 5.12 get the first (and refuse it, saying why).
        let old = env::var_os(PREBUILT_NO_CMPXCHG).unwrap_or_else(|| obj.clone());
        for (var, obj, name) in [
            ("MEMBARRIER_TRACE_EBPF_OBJECT", obj, PREBUILT),
            (
                "MEMBARRIER_TRACE_EBPF_OBJECT_NO_CMPXCHG",
                old,
                PREBUILT_NO_CMPXCHG,
            ),
        ] {
            let obj = PathBuf::from(obj);
            if !obj.is_file() {
                bail!("{name}={} is not a file", obj.display());
            }
            println!("cargo:rerun-if-changed={}", obj.display());
            println!(
                "cargo:rustc-env={var}={}",
                obj.to_str().context("non-UTF-8 path")?
            );
        }
        return Ok(());
    }
    // Plain `cargo build`: aya-build runs `cargo +nightly build -Z build-std=core --target
    // bpfel-unknown-none` (its progress arrives as cargo warnings), whose link step needs
    // bpf-linker on PATH. Say how to get it instead of failing in the linker.
    println!("cargo:rerun-if-env-changed=PATH");
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !on_path && env::var_os("AYA_BUILD_SKIP").is_none() {
        bail!(
            "bpf-linker is not on PATH: build with `cargo xtask build` (or `cargo xtask run`), \
             which installs it and sets PATH"
        );
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("..").join("membarrier-trace-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "membarrier-trace-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("membarrier-trace");
    // One object only (kernels before 5.12 refuse it): `cargo xtask build` makes both.
    for var in [
        "MEMBARRIER_TRACE_EBPF_OBJECT",
        "MEMBARRIER_TRACE_EBPF_OBJECT_NO_CMPXCHG",
    ] {
        println!(
            "cargo:rustc-env={var}={}",
            out.to_str().context("non-UTF-8 path")?
        );
    }
    Ok(())
}
