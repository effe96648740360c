use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

/// Set by `cargo xtask` to the eBPF object it built (once, into target/bpf, with its progress
/// shown as such): then this script only points the collector at it.
const PREBUILT: &str = "MEMBARRIER_TRACE_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={PREBUILT}");
    if let Some(obj) = env::var_os(PREBUILT) {
        let obj = PathBuf::from(obj);
        if !obj.is_file() {
            bail!("{PREBUILT}={} is not a file", obj.display());
        }
        println!("cargo:rerun-if-changed={}", obj.display());
        println!(
            "cargo:rustc-env=MEMBARRIER_TRACE_EBPF_OBJECT={}",
            obj.to_str().context("non-UTF-8 path")?
        );
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
    println!(
        "cargo:rustc-env=MEMBARRIER_TRACE_EBPF_OBJECT={}",
        out.to_str().context("non-UTF-8 path")?
    );
    Ok(())
}
