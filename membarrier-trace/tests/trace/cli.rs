//! The command line: signals, intervals, bad input, hostile names, closed pipes, the command's log.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::*;

#[test]
fn sigint_prints_the_final_summary() {
    let _machine = require_root();
    let tracer = Tracer::start(&["-o", "text"]);
    let mut w = Workload::start(&["--expedited", "1000"]);
    w.go();
    let pid = w.pid;
    w.finish();
    tracer.signal(libc::SIGINT);
    let out = tracer.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("membarrier-trace: "), "{text}");
    // Tracing every process: the workload's row is there, exact (1000 calls + registration).
    assert!(
        text.contains(&format!("PID {pid} (membarrier-work, exited): 1001 calls")),
        "{text}"
    );
}

#[test]
fn sigterm_in_command_mode_stops_the_command_too() {
    let _machine = require_root();
    let mut child = tracer()
        .args(["-o", "json", "--", "sleep", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stderr = wait_for_line(child.stderr.take().unwrap(), "membarrier-trace: tracing");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let out = wait_output(child);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let report = last_json_with(&String::from_utf8_lossy(&out.stdout), "processes");
    assert_eq!(report["processes"].as_array().unwrap().len(), 0);
}

#[test]
fn interval_prints_one_json_document_per_line() {
    let _machine = require_root();
    let start = Instant::now();
    let out = run(tracer().args(["-o", "json", "-i", "0.25", "-d", "1.1"]));
    assert!(out.status.success());
    assert!(start.elapsed() < Duration::from_secs(10));
    let docs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON document"))
        .collect();
    // Four interval reports and the final one.
    assert_eq!(docs.len(), 5, "{docs:?}");
    let durations: Vec<u64> = docs
        .iter()
        .map(|d| d["duration_ns"].as_u64().unwrap())
        .collect();
    assert!(durations.windows(2).all(|w| w[0] < w[1]), "{durations:?}");
    assert!(durations[4] >= 1_100_000_000);
}

#[test]
fn bad_input_is_one_line_and_exit_2_for_usage_1_at_runtime() {
    let _machine = require_root();
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let missing = (2..pid_max)
        .rev()
        .find(|p| !PathBuf::from(format!("/proc/{p}")).exists())
        .unwrap();
    expect_error(
        1,
        Command::new(TRACER).args(["--pid", &missing.to_string()]),
        &format!("no process with pid {missing}"),
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-d", "0"]),
        "not a positive number",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "yaml"]),
        "invalid value 'yaml'",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["calibrate", "--calls", "0"]),
        "invalid value '0' for '--calls",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--stacks", "--stack-rate", "150"]),
        "150: give a multiple of 100 from 100 to 1000000",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--stack-rate", "100"]),
        "--stack-rate sets the rate of --stacks, which is not given",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "none"]),
        "-o none shows nothing without --listen",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--by", "comm"]),
        "--by and --keep-exited shape the metrics of --listen",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--listen", "9479"]),
        "`9479` is not HOST:PORT or :PORT",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "json", "calibrate"]),
        "unexpected argument 'calibrate'",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    expect_error(
        1,
        Command::new(TRACER).args(["--listen", &taken]),
        &format!("listening on {taken}: Address in use (os error 98)"),
    );
    expect_error(
        1,
        Command::new(TRACER).args(["--", "/nonexistent/program"]),
        "cannot run `/nonexistent/program`",
    );
    // A thread id instead of a process id.
    let w = Command::new(WORKLOAD)
        .args(["--global", "40", "--threads", "2", "--expedited", "200000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tid = (0..200)
        .find_map(|_| {
            thread::sleep(Duration::from_millis(10));
            std::fs::read_dir(format!("/proc/{}/task", w.id()))
                .ok()?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .find(|&t| t != w.id())
        })
        .expect("workload thread");
    expect_error(
        1,
        Command::new(TRACER).args(["--pid", &tid.to_string()]),
        &format!("is a thread of process {}", w.id()),
    );
    let _ = wait_output(w);
    // Not root: drop to nobody.
    expect_error(
        1,
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", TRACER]),
        "must run as root",
    );
}

/// Under the dashboard a command's output goes to a log file, created by root in the temporary
/// directory, which other users can write to. Another user who plants a symlink or a file of
/// their own at the name the log once had (`membarrier-trace-PID.log`, the pid known in
/// advance to a wrapper that execs the tracer) must get nothing: the file the link points to
/// stays whole, theirs stays empty, and the log is a new file of root's, mode 0600, named on
/// exit. The kernel's protections against such plants are turned off, as in many containers.
#[test]
fn the_commands_log_cannot_be_planted_by_another_user() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let _machine = require_root();
    let _links = Sysctl::set("fs/protected_symlinks", 0);
    let _regular = Sysctl::set("fs/protected_regular", 0);
    let dir = tempfile::tempdir().unwrap();
    // A shared directory like /tmp: anyone may create files, sticky.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = dir.path().join("precious");
    std::fs::write(&victim, "root's data\n").unwrap();
    let plant = dir.path().join("plant.sh");
    std::fs::write(
        &plant,
        format!(
            r#"name="$TMPDIR/membarrier-trace-$$.log"
if [ "$1" = link ]; then ln -s {victim} "$name"; else : > "$name"; chown 65534 "$name"; chmod 666 "$name"; fi
exec {TRACER} -- {WORKLOAD} --query 2
"#,
            victim = victim.display()
        ),
    )
    .unwrap();
    let t = Tmux::shell(250, 30);
    for kind in ["link", "file"] {
        t.keys("clear");
        t.keys(&format!(
            "TMPDIR={} sh {} {kind}; echo rc=$?",
            shared.display(),
            plant.display()
        ));
        t.wait_for("the dashboard did not say the command exited", &|s| {
            s.contains("exited with status 0; tracing stopped, q leaves")
        });
        t.keys("q");
        let screen = t.wait_for_prompt();
        assert!(screen.contains("rc=0"), "{kind}: {screen}");
        let log = screen
            .lines()
            .find_map(|l| l.split("the command's output is in ").nth(1))
            .unwrap_or_else(|| panic!("{kind}: no log named: {screen}"))
            .trim()
            .to_string();
        let planted: Vec<PathBuf> = std::fs::read_dir(&shared)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str() != Some(log.as_str()))
            .collect();
        assert_eq!(planted.len(), 1, "{kind}: {planted:?} beside {log}");
        let meta = std::fs::symlink_metadata(&log).unwrap();
        assert!(meta.is_file(), "{kind}: {log} is not a plain file");
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o600),
            "{kind}: {log}"
        );
        let output = std::fs::read_to_string(&log).unwrap();
        assert!(
            output.contains("\"outcomes\""),
            "{kind}: the log has {output:?}"
        );
        // The plant got nothing, and what it points to is whole.
        if kind == "file" {
            assert_eq!(std::fs::read(&planted[0]).unwrap(), b"", "{kind}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's data\n");
        std::fs::remove_file(&log).unwrap();
        std::fs::remove_file(&planted[0]).unwrap();
    }
}

#[test]
fn hostile_process_names_are_escaped_in_text() {
    let _machine = require_root();
    let name = "\x1b[2J\x1b[31mEV\nIL";
    let out = run(tracer().args(["-o", "text", "--", WORKLOAD, "--query", "1", "--name", name]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains('\x1b'), "raw ESC in: {text:?}");
    assert!(
        text.contains("(\\x1b[2J\\x1b[31mEV\\x0aIL, exited)"),
        "{text}"
    );
    // JSON keeps the name as it is, escaped the JSON way.
    let out = run(tracer().args(["-o", "json", "--", WORKLOAD, "--query", "1", "--name", name]));
    let report = last_json_with(&String::from_utf8_lossy(&out.stdout), "processes");
    assert_eq!(report["processes"][0]["comm"], name);
}

#[test]
fn closed_stdout_stops_the_tracer() {
    let _machine = require_root();
    let mut tracer = Tracer::start(&["-o", "json", "-i", "0.1"]);
    let mut line = String::new();
    BufReader::new(tracer.child().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with('{'), "{line}");
    // The reader is gone (like `| head -1`): the next write fails and the tracer detaches.
    let t = Instant::now();
    let out = tracer.finish();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(141));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdout closed"), "{err}");
}

#[test]
fn bad_durations_are_refused_before_attaching() {
    for (args, says) in [
        (&["-d", "1e300"][..], "too long"),
        (&["-i", "1e19"][..], "too long"),
        (&["-d", "-1"][..], "not a positive number"),
        (&["-i", "0.001"][..], "too short"),
        (&["-d", "nan"][..], "not a positive number"),
    ] {
        let out = run(Command::new(TRACER).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
