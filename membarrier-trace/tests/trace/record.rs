//! `record` and `report`: a run kept in a file and read back, whole or a window of it, cut off
//! by SIGKILL or a full disk, and drawn as SVG.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::common::*;

/// `membarrier-trace record FILE ARGS`, with `--attach $MT_ATTACH` when that is set.
fn recorder(file: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(TRACER);
    c.arg("record").arg(file);
    if let Ok(mode) = std::env::var("MT_ATTACH") {
        c.args(["--attach", &mode]);
    }
    c.args(args);
    c
}

/// `membarrier-trace report FILE ARGS`: its output, which must succeed.
fn report(file: &Path, args: &[&str]) -> std::process::Output {
    let out = run(Command::new(TRACER).arg("report").arg(file).args(args));
    assert!(
        out.status.success(),
        "report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn report_json(file: &Path, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend(args);
    let out = report(file, &all);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A private directory (0700, a random name) for the test's files.
fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mt-record-")
        .tempdir()
        .unwrap()
}

/// Calls of process `pid` in a JSON report, per (cmd, flags, errno); empty if it has none.
fn calls_of(r: &Value, pid: u32) -> BTreeMap<(i64, u64, String), u64> {
    r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .map(tracer_counts)
        .unwrap_or_default()
}

/// A recording of two processes: the whole file reports exactly what the live run's final
/// report said (the same document), each process's calls are its own count, `-p` keeps one,
/// and two windows that meet add up to the whole, call for call.
#[test]
fn a_recording_reports_what_the_live_run_did() {
    let _machine = require_root();
    let dir = private_dir();
    let file = dir.path().join("run.mtr");
    // 5,000 calls a second for about 2.4 s: a few 1 s intervals.
    let a = Workload::start(&[
        "--global-expedited",
        "12000",
        "--rate",
        "5000",
        "--global",
        "2",
        "--eperm",
        "5",
    ]);
    let b = Workload::start(&["--expedited", "3000", "--invalid", "4"]);
    let (pa, pb) = (a.pid, b.pid);
    let tracer = Tracer::spawn(&mut recorder(
        &file,
        &["-o", "json", "-p", &pa.to_string(), "-p", &pb.to_string()],
    ));
    let (mut a, mut b) = (a, b);
    a.go();
    b.go();
    let (mine_a, mine_b) = (a.finish(), b.finish());
    let (out, live) = tracer.report();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("membarrier-trace: recorded "), "{stderr}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a recording is root's alone");

    let whole = report_json(&file, &[]);
    assert_eq!(whole, live, "the whole recording is the live final report");
    assert_eq!(calls_of(&whole, pa), workload_counts(&mine_a));
    assert_eq!(calls_of(&whole, pb), workload_counts(&mine_b));

    let only_b = report_json(&file, &["-p", &pb.to_string()]);
    assert_eq!(only_b["processes"].as_array().unwrap().len(), 1);
    assert_eq!(calls_of(&only_b, pb), workload_counts(&mine_b));

    // Split at 1.5 s: what is before and what is after add up to the whole, row for row.
    let before = report_json(&file, &["--to", "1.5"]);
    let after = report_json(&file, &["--from", "1.5"]);
    let n = |r: &Value| r["calls"].as_u64().unwrap();
    assert!(
        n(&before) > 0 && n(&after) > 0,
        "{} {}",
        n(&before),
        n(&after)
    );
    assert_eq!(n(&before) + n(&after), n(&whole));
    for pid in [pa, pb] {
        let mut sum = calls_of(&before, pid);
        for (k, v) in calls_of(&after, pid) {
            *sum.entry(k).or_default() += v;
        }
        assert_eq!(sum, calls_of(&whole, pid), "pid {pid}");
    }
    // The same split by wall-clock time: the time of the interval it ends with.
    let t1 = before["time"].as_str().unwrap();
    assert_eq!(report_json(&file, &["--to", t1])["calls"], before["calls"]);

    // Text and folded read the same file; folded needs stacks, which this run did not take.
    let text = String::from_utf8(report(&file, &[]).stdout).unwrap();
    assert!(
        text.contains(&format!("PID {pa} (membarrier-work)")),
        "{text}"
    );
    expect_error(
        1,
        Command::new(TRACER)
            .args(["report", "-o", "folded"])
            .arg(&file),
        "without --stacks",
    );
}

/// SIGKILL in the middle of a run: the file reads back up to its last whole interval, says it
/// was cut off, and counts no call the workload did not make; a torn last entry (the bytes
/// cut anywhere) costs that entry alone.
#[test]
fn a_killed_recording_reads_up_to_its_last_whole_interval() {
    let _machine = require_root();
    let dir = private_dir();
    let file = dir.path().join("killed.mtr");
    let mut w = Workload::start(&["--global-expedited", "20000", "--rate", "5000"]);
    let pid = w.pid.to_string();
    let tracer = Tracer::spawn(&mut recorder(&file, &["-i", "0.2", "-p", &pid]));
    w.go();
    thread::sleep(Duration::from_millis(1500));
    tracer.signal(libc::SIGKILL);
    let killed = tracer.finish();
    assert_eq!(killed.status.code(), None, "killed by a signal");
    let mine = w.finish();
    let made = workload_counts(&mine).values().sum::<u64>();

    let out = report(&file, &["-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the recording was cut off"), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen = r["calls"].as_u64().unwrap();
    // About 1.5 s of 5,000 calls a second, in 0.2 s intervals.
    assert!(seen > 1000 && seen < made, "{seen} of {made}");

    // Cuts anywhere in the last 300 bytes: the report still reads, never more calls for
    // fewer bytes, and a torn last entry (one byte short) costs that entry alone (0.2 s of
    // calls: allow three intervals' worth for a late tick).
    let bytes = std::fs::read(&file).unwrap();
    let cut_file = dir.path().join("cut.mtr");
    let mut last = 0;
    for cut in (bytes.len().saturating_sub(300)..bytes.len())
        .step_by(7)
        .chain([bytes.len() - 1])
    {
        std::fs::write(&cut_file, &bytes[..cut]).unwrap();
        let n = report_json(&cut_file, &[])["calls"].as_u64().unwrap();
        assert!(
            n >= last && n <= seen,
            "cut at {cut}: {n} after {last}, of {seen}"
        );
        last = n;
    }
    assert!(last < seen && last + 3000 >= seen, "torn: {last} of {seen}");
}

/// A disk that fills: one line naming the file and what it holds, exit status 1, and the file
/// reads back up to its last whole interval.
#[test]
fn a_full_disk_ends_the_recording_with_what_it_holds() {
    let _machine = require_root();
    let dir = private_dir();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12k", "tmpfs"])
        .arg(&mnt));
    assert!(mounted.status.success(), "{mounted:?}");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let file = mnt.join("full.mtr");
    // Many intervals with changes in each: the 12 KiB fill in a few seconds.
    let out = run(&mut recorder(
        &file,
        &[
            "-i",
            "0.02",
            "-d",
            "30",
            "--",
            WORKLOAD,
            "--loop-paced",
            "150000",
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap();
    assert!(
        last.contains("writing the recording") && last.contains("No space left on device"),
        "{stderr}"
    );
    let r = report(&file, &["-o", "json"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("cut off"));
    let r: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(r["calls"].as_u64().unwrap() > 0);
}

/// The SVG parses as XML, needs nothing from the network, names each chart's process and cmd,
/// and each heatmap's cells add up to its calls: the workload's own count.
#[test]
fn the_svg_draws_every_call() {
    let _machine = require_root();
    let dir = private_dir();
    let file = dir.path().join("drawn.mtr");
    let mut w = Workload::start(&[
        "--global-expedited",
        "4000",
        "--rate",
        "4000",
        "--global",
        "3",
    ]);
    let pid = w.pid;
    let tracer = Tracer::spawn(&mut recorder(
        &file,
        &["-i", "0.25", "--stacks", "-p", &pid.to_string()],
    ));
    w.go();
    let mine = w.finish();
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    let svg = dir.path().join("drawn.svg");
    report(&file, &["--svg", svg.to_str().unwrap()]);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the SVG is XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    for n in doc.descendants() {
        for a in n.attributes() {
            assert!(
                !a.value().contains("http") || a.name() == "xmlns",
                "{}={}: nothing to fetch",
                a.name(),
                a.value()
            );
        }
        assert!(!matches!(
            n.tag_name().name(),
            "script" | "image" | "use" | "a"
        ));
    }
    let truth = workload_counts(&mine);
    let mut drawn = BTreeMap::new();
    for chart in doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("chart"))
    {
        let of = chart.attribute("data-of").unwrap();
        assert!(
            of.contains(&format!("({pid})")) && of.contains("membarrier-work"),
            "{of}"
        );
        let total: u64 = chart.attribute("data-total").unwrap().parse().unwrap();
        let cells: u64 = chart
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .map(|n| n.attribute("data-calls").unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(cells, total, "{of}");
        drawn.insert(of.rsplit(' ').next().unwrap().to_string(), total);
    }
    assert_eq!(drawn["GLOBAL_EXPEDITED"], truth[&(2, 0, String::new())]);
    assert_eq!(drawn["GLOBAL"], truth[&(1, 0, String::new())]);
    // Stacks were taken: a flame graph of every call with a stack.
    let flame = doc
        .descendants()
        .find(|n| n.attribute("class") == Some("flame"))
        .expect("a flame graph");
    let with_stacks: u64 = flame.attribute("data-total").unwrap().parse().unwrap();
    assert!(with_stacks > 0 && with_stacks <= truth.values().sum::<u64>());
    // The same stacks as folded lines: their calls are the flame graph's.
    let folded = String::from_utf8(report(&file, &["-o", "folded"]).stdout).unwrap();
    let folded_calls: u64 = folded
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(folded_calls, with_stacks);
    // An existing file is never written over.
    expect_error(
        1,
        Command::new(TRACER)
            .arg("report")
            .arg(&file)
            .arg("--svg")
            .arg(&svg),
        "a new file",
    );
}

/// Bad input: a file that is not a recording, an existing or linked FILE to record into, a
/// window that is empty: one line each, and the existing file untouched.
#[test]
fn bad_recordings_and_windows_are_one_line_errors() {
    let _machine = require_root();
    let dir = private_dir();
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "not a recording\n").unwrap();
    expect_error(
        1,
        Command::new(TRACER).arg("report").arg(&other),
        "not a membarrier-trace recording",
    );
    expect_error(
        1,
        &mut recorder(&other, &["-d", "0.1"]),
        "never written over",
    );
    assert_eq!(
        std::fs::read_to_string(&other).unwrap(),
        "not a recording\n"
    );
    let link = dir.path().join("link.mtr");
    std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
    expect_error(
        1,
        &mut recorder(&link, &["-d", "0.1"]),
        "never written over",
    );
    assert!(
        !dir.path().join("target").exists(),
        "no file made through the link"
    );
    expect_error(
        1,
        Command::new(TRACER)
            .arg("report")
            .arg(dir.path().join("missing.mtr")),
        "missing.mtr",
    );

    // `-- COMMAND`: the command's exit status, as a live run passes it on.
    let file = dir.path().join("command.mtr");
    let out = run(&mut recorder(
        &file,
        &["--", WORKLOAD, "--query", "2", "--exit-code", "3"],
    ));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let r = report_json(&file, &[]);
    assert_eq!(r["calls"], 2, "{r}");

    let file = dir.path().join("short.mtr");
    let out = run(&mut recorder(&file, &["-d", "1.5", "-i", "0.5"]));
    assert!(out.status.success(), "{out:?}");
    expect_error(
        1,
        Command::new(TRACER)
            .arg("report")
            .arg(&file)
            .args(["--from", "1", "--to", "0.6"]),
        "--from is not before --to",
    );
    expect_error(
        2,
        Command::new(TRACER)
            .arg("report")
            .arg(&file)
            .args(["--from", "yesterday"]),
        "yesterday",
    );
}

/// `replay` in tmux: it opens at the first interval; Right, End, Home and `g` move through the
/// recording; at the end the process's calls are the workload's own count; a time that is
/// not one is said on screen; q leaves a clean shell.
#[test]
fn replay_moves_through_the_recording_in_tmux() {
    let _machine = require_root();
    let dir = private_dir();
    let file = dir.path().join("replayed.mtr");
    // 3,000 calls a second for 2 s, in 0.5 s intervals.
    let mut w = Workload::start(&["--global-expedited", "6000", "--rate", "3000"]);
    let pid = w.pid.to_string();
    let tracer = Tracer::spawn(&mut recorder(&file, &["-i", "0.5", "-p", &pid]));
    w.go();
    let total: u64 = workload_counts(&w.finish()).values().sum();
    assert!(tracer.finish().status.success());

    let t = Tmux::shell(120, 40);
    t.keys(&format!("{TRACER} replay {}", file.display()));
    // PID COMM CALLS/S CALLS: the process's calls so far; and where the replay is.
    let calls = |s: &str| {
        s.lines().find_map(|l| {
            let f: Vec<&str> = l
                .trim_matches(|c| c == '│' || c == ' ')
                .split_whitespace()
                .collect();
            // An exited process's pid is marked `x`, and its COMM cell says so (two words):
            // CALLS follows the first number after the pid.
            if f.len() < 4 || f[0].trim_start_matches('x') != pid {
                return None;
            }
            let rate = f[1..].iter().position(|t| t.parse::<f64>().is_ok())?;
            f.get(rate + 2)?.parse::<u64>().ok()
        })
    };
    let at = |s: &str| -> Option<(usize, usize, f64)> {
        let l = s.lines().find(|l| l.contains("replay: interval "))?;
        let rest = l.split("replay: interval ").nth(1)?;
        let (k, rest) = rest.split_once(" of ")?;
        let (n, rest) = rest.split_once(", ")?;
        let secs = rest.split_once(" s")?.0;
        Some((k.parse().ok()?, n.parse().ok()?, secs.parse().ok()?))
    };
    let screen = t.wait_for("no replay at its first interval", &|s| {
        at(s).is_some_and(|a| a.0 == 1) && calls(s).is_some()
    });
    let (_, n, _) = at(&screen).unwrap();
    let first = calls(&screen).unwrap();
    assert!(
        n >= 3 && first > 0 && first < total,
        "{first} of {total}, {n}: {screen}"
    );

    t.run(&["send-keys", "End"]);
    let screen = t.wait_for("End did not go to the last interval", &|s| {
        at(s).is_some_and(|a| a.0 == n)
    });
    assert_eq!(calls(&screen), Some(total), "{screen}");
    t.run(&["send-keys", "Home"]);
    let screen = t.wait_for("Home did not go back", &|s| at(s).is_some_and(|a| a.0 == 1));
    assert_eq!(calls(&screen), Some(first), "{screen}");
    t.run(&["send-keys", "Right"]);
    let screen = t.wait_for("Right did not move on", &|s| {
        at(s).is_some_and(|a| a.0 == 2)
    });
    assert!(calls(&screen).unwrap() > first, "{screen}");

    // From the end, g and a time: the interval holding 1.2 s (it ends at or before 1.2 s, the
    // next one after).
    t.run(&["send-keys", "End"]);
    t.wait_for("End did not go to the last interval", &|s| {
        at(s).is_some_and(|a| a.0 == n)
    });
    t.run(&["send-keys", "g", "1.2", "Enter"]);
    let screen = t.wait_for("g 1.2 did not jump", &|s| at(s).is_some_and(|a| a.0 != n));
    let (k, _, secs) = at(&screen).unwrap();
    assert!(secs <= 1.2, "{screen}");
    t.run(&["send-keys", "Right"]);
    let screen = t.wait_for("Right did not move on", &|s| {
        at(s).is_some_and(|a| a.0 == k + 1)
    });
    assert!(
        at(&screen).unwrap().2 > 1.2,
        "the next interval ends after 1.2 s: {screen}"
    );
    t.run(&["send-keys", "g", "soon", "Enter"]);
    t.wait_for("a bad time was not said", &|s| {
        s.contains("`soon` is neither")
    });

    t.keys("q");
    t.wait_for_prompt();
}
