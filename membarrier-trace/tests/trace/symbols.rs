//! Names that outlive the process: every frame and caller carries its module's build ID and
//! its module offset; stripped code is named from its split debug file found by build ID, at
//! once (`--debug-dir`) or later, on a saved report (`membarrier-trace symbolize`). Checked
//! against binutils: `readelf -n` for the build ID, `addr2line -f -e DEBUG_FILE` for the
//! function at the offset.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::common::*;

fn tool(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(name).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `readelf -n`'s GNU build ID of `path`.
fn readelf_build_id(path: &Path) -> String {
    let notes = tool("readelf", &["-n".as_ref(), path.as_ref()]);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build ID in {}: {notes}", path.display()))
        .to_string()
}

/// The function `addr2line -f -e FILE` puts at `addr`.
fn addr2line_function(file: &Path, addr: u64) -> String {
    let addr = format!("{addr:#x}");
    let out = tool(
        "addr2line",
        &["-f".as_ref(), "-e".as_ref(), file.as_ref(), addr.as_ref()],
    );
    out.lines().next().unwrap_or_default().to_string()
}

/// Every frame of every stack of the process running `module`, in that module.
fn frames_in<'a>(report: &'a Value, module: &str) -> Vec<&'a Value> {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["cmds"].as_array().unwrap())
        .flat_map(|c| c["stacks"].as_array().into_iter().flatten())
        .flat_map(|s| s["frames"].as_array().unwrap())
        .filter(|f| f["module"] == module)
        .collect()
}

/// A liburcu writer built with debug info, stripped (no .gnu_debuglink: the build ID is all
/// that ties the two), and its split debug file, in a folder others may read.
struct Stripped {
    dir: tempfile::TempDir,
    bin: PathBuf,
    debug: PathBuf,
    build_id: String,
}

fn stripped_program() -> Stripped {
    let bin = build_urcu_program("urcu_writer", "urcu_writer_g", &["-lurcu-memb", "-g"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let stripped = dir.path().join("urcu_stripped");
    let debug = dir.path().join("urcu_writer.debug");
    tool(
        "objcopy",
        &["--only-keep-debug".as_ref(), bin.as_ref(), debug.as_ref()],
    );
    tool(
        "strip",
        &[
            "--strip-all".as_ref(),
            "-o".as_ref(),
            stripped.as_ref(),
            bin.as_ref(),
        ],
    );
    let build_id = readelf_build_id(&stripped);
    assert_eq!(build_id, readelf_build_id(&debug));
    Stripped {
        dir,
        bin: stripped,
        debug,
        build_id,
    }
}

#[test]
fn stripped_code_is_named_from_its_debug_file_at_once_or_later() {
    let _machine = require_root();
    let Stripped {
        dir,
        bin: stripped,
        debug,
        build_id: id,
    } = stripped_program();
    let module = stripped.to_str().unwrap();
    let traced = |extra: &[&std::ffi::OsStr], output: &str| {
        run(tracer()
            .args(["-o", output, "--stacks"])
            .args(extra)
            .arg("--")
            .arg(&stripped)
            .arg("50"))
    };

    // Traced without the debug file: main, the grace periods' caller, has no symbol here.
    let report = report_of(&traced(&[], "json"));
    let writers = report["rcu_writers"].as_array().unwrap();
    assert_eq!(writers.len(), 1, "{writers:#?}");
    let caller = &writers[0]["caller"];
    assert_eq!(caller["symbol"], Value::Null, "{caller:#}");
    assert_eq!(caller["module"], module, "{caller:#}");
    assert_eq!(caller["build_id"], id.as_str(), "{caller:#}");
    let offset = caller["module_offset"].as_u64().unwrap();
    // A return address: the call is the byte before it.
    assert_eq!(addr2line_function(&debug, offset - 1), "main", "{caller:#}");
    // The stacks' frames in the program: main, which called synchronize_rcu, and _start,
    // outermost, as addr2line names them; unnamed here.
    let frames = frames_in(&report, module);
    let functions = |frames: &[&Value]| -> Vec<String> {
        frames
            .iter()
            .map(|f| addr2line_function(&debug, f["module_offset"].as_u64().unwrap() - 1))
            .collect()
    };
    let expected = functions(&frames);
    assert!(expected.iter().any(|f| f == "main"), "{expected:?}");
    for f in &frames {
        assert_eq!(f["symbol"], Value::Null, "{f:#}");
        assert_eq!(f["build_id"], id.as_str(), "{f:#}");
    }
    // libc's local functions (no symbol table in Debian's libc) are named from its debug file
    // in /usr/lib/debug (libc6-dbg, which `cargo xtask test` installs).
    let libc_local = report
        .to_string()
        .contains("\"symbol\":\"__libc_start_call_main\"");
    assert!(libc_local, "{report:#}");
    // Text prints it as perf does.
    let text = traced(&[], "text");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("urcu_stripped+{offset:#x}")),
        "{text}"
    );

    // The debug file under a build-ID tree, as -dbgsym packages install it.
    let tree = dir.path().join("debug");
    let at = tree
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &at).unwrap();

    // Later: the saved report named by `symbolize`, not as root.
    let saved = dir.path().join("report.json");
    std::fs::write(&saved, format!("{report}\n")).unwrap();
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TRACER])
        .arg("symbolize")
        .arg("--debug-dir")
        .arg(&tree)
        .arg(&saved));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The caller and the program's frames named (libc's local functions, such as
    // __libc_start_call_main, stay unnamed: Debian's libc has no symbol table and no debug
    // file here).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let counts: Vec<usize> = stderr
        .split("named ")
        .nth(1)
        .and_then(|r| r.split(" frames").next())
        .map(|r| r.split(" of ").filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    assert!(
        counts.len() == 2 && counts[0] <= counts[1] && counts[0] > frames.len(),
        "{stderr}"
    );
    let later: Value = serde_json::from_slice(&out.stdout).unwrap();
    let named = &later["rcu_writers"][0]["caller"];
    assert_eq!(named["symbol"], "main", "{named:#}");
    assert!(
        named["file"].as_str().unwrap().ends_with("urcu_writer.c"),
        "{named:#}"
    );
    assert!(named["line"].as_u64().unwrap() > 0, "{named:#}");
    let later_frames = frames_in(&later, module);
    let symbols: Vec<&str> = later_frames
        .iter()
        .map(|f| f["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(symbols, expected, "{later_frames:#?}");

    // At once: traced with --debug-dir, named as symbolize named it.
    let now = report_of(&traced(&["--debug-dir".as_ref(), tree.as_ref()], "json"));
    let caller = &now["rcu_writers"][0]["caller"];
    for field in [
        "symbol",
        "offset",
        "file",
        "line",
        "build_id",
        "module_offset",
    ] {
        assert_eq!(caller[field], named[field], "{field}: {caller:#} {named:#}");
    }
    let frames = frames_in(&now, module);
    let symbols: Vec<&str> = frames
        .iter()
        .map(|f| f["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(symbols, functions(&frames), "{frames:#?}");
    assert!(symbols.contains(&"main"), "{frames:#?}");
}

/// Bad input to `symbolize`: one line and exit 2 or 1.
#[test]
fn symbolize_refuses_what_is_not_a_report() {
    let _machine = require_root();
    let dir = tempfile::tempdir().unwrap();
    let not_json = dir.path().join("x.json");
    std::fs::write(&not_json, "grace periods: 5\n").unwrap();
    expect_error(
        1,
        Command::new(TRACER).arg("symbolize").arg(&not_json),
        "line 1: not a JSON document",
    );
    let missing = PathBuf::from("/nonexistent/report.json");
    expect_error(
        1,
        Command::new(TRACER).arg("symbolize").arg(&missing),
        "opening /nonexistent/report.json",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["symbolize"]),
        "required arguments were not provided",
    );
}

/// A debug file served by debuginfod (elfutils' server over a folder holding only it), fetched
/// for a stripped program when DEBUGINFOD_URLS is set, into the cache DEBUGINFOD_CACHE_PATH
/// names; not looked for without DEBUGINFOD_URLS.
#[test]
fn stripped_code_is_named_through_debuginfod() {
    let _machine = require_root();
    let s = stripped_program();
    let served = s.dir.path().join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::copy(&s.debug, served.join("urcu_writer.debug")).unwrap();
    let port = free_port().to_string();
    let _server = Killed(
        Command::new("debuginfod")
            .arg("-F")
            .arg(&served)
            .args(["-p", &port, "-d"])
            .arg(s.dir.path().join("debuginfod.sqlite"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("debuginfod (cargo xtask test installs it)"),
    );
    let url = format!("http://127.0.0.1:{port}");
    // Until its first scan has the file (a second or two). A fresh cache for each try: the
    // client keeps a miss for 10 minutes.
    let probe_cache = s.dir.path().join("probe-cache");
    let served_now = || {
        let _ = std::fs::remove_dir_all(&probe_cache);
        Command::new("debuginfod-find")
            .args(["debuginfo", &s.build_id])
            .env("DEBUGINFOD_URLS", &url)
            .env("DEBUGINFOD_CACHE_PATH", &probe_cache)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let started = std::time::Instant::now();
    while !served_now() {
        assert!(
            started.elapsed() < TIMEOUT,
            "debuginfod never served the file"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let cache = s.dir.path().join("cache");
    let traced = |urls: &str| {
        report_of(&run(tracer()
            .env("DEBUGINFOD_URLS", urls)
            .env("DEBUGINFOD_CACHE_PATH", &cache)
            .args(["-o", "json", "--"])
            .arg(&s.bin)
            .arg("20")))
    };
    let report = traced("");
    assert_eq!(report["rcu_writers"][0]["caller"]["symbol"], Value::Null);
    assert!(!cache.exists());
    let report = traced(&url);
    let caller = &report["rcu_writers"][0]["caller"];
    assert_eq!(caller["symbol"], "main", "{caller:#}");
    assert_eq!(caller["build_id"], s.build_id.as_str(), "{caller:#}");
    assert!(cache.join(&s.build_id).join("debuginfo").is_file());
}
