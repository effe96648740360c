//! Exact counts: per process, per thread and per cmd, through pid filters, command mode,
//! pid wraps, bursts of short-lived processes and full maps.

use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::*;

#[test]
fn pid_filter_counts_exactly_and_ignores_others() {
    let _machine = require_root();
    // Another process making calls at the same time must not appear.
    let other = Workload::start(&["--expedited", "5000", "--query", "5", "--global", "1"]);
    let other_pid = other.pid;
    let (out, report, own) = trace_pids(vec![Workload::start(MIX)], vec![other]);
    let (w_pid, mine) = own.into_iter().next().unwrap();
    // The tracer stops by itself once every traced process has exited.
    assert!(String::from_utf8_lossy(&out.stderr).contains("every traced process has exited"));
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "only the traced pid: {report}");
    assert_ne!(procs[0]["pid"], other_pid);
    let p = process(&report, w_pid);
    assert_eq!(p["comm"], "membarrier-work");

    // Exactly the workload's calls, per cmd, flags and errno: no more, no fewer.
    let expected = workload_counts(&mine);
    let missed = assert_counts(&report, p, &mine);
    // And that is the mix we asked for (the workload really made these calls).
    assert_eq!(expected[&(8, 0, "EPERM".into())], 11);
    assert_eq!(expected[&(0, 0, String::new())], 3);
    assert_eq!(expected[&(3, 0, "EINVAL".into())], 7);
    assert_eq!(expected[&(8, 1, "EINVAL".into())], 2);
    assert_eq!(expected[&(16, 0, String::new())], 1);
    assert_eq!(expected[&(8, 0, String::new())], 30000);
    assert_eq!(expected[&(1, 0, String::new())], 5);
    assert_eq!(
        p["calls"].as_u64().unwrap() + missed,
        30000 + 11 + 3 + 7 + 2 + 1 + 5
    );
    if missed == 0 {
        assert_eq!(p["errors"], 11 + 7 + 2);
        // PRIVATE_EXPEDITED before registering: flagged.
        assert_eq!(p["unregistered_eperm"], 11);
        // Each thread's calls, by name: the four named threads' own counts, and the main
        // thread's EPERM calls; the main thread alone registered.
        let mut want: Vec<Value> = mine["expedite_threads"].as_array().unwrap().clone();
        want.push(json!({"tid": w_pid, "name": "membarrier-work", "calls": 11}));
        want.sort_by_key(|t| (std::cmp::Reverse(t["calls"].as_u64()), t["tid"].as_u64()));
        assert_eq!(want.len(), 5);
        assert_eq!(cmd_row(p, 8, 0)["threads"], Value::Array(want));
        assert_eq!(
            cmd_row(p, 16, 0)["threads"],
            json!([{"tid": w_pid, "name": "membarrier-work", "calls": 1}])
        );
    }
    assert_eq!(report["dropped"]["total"], 0, "{}", report["dropped"]);

    // Latency is measured inside the kernel, so it never exceeds what the workload measured
    // around the same calls: per row, the sum and the max are bounded by userspace's.
    for o in mine["outcomes"].as_array().unwrap() {
        let (cmd, flags) = (o["cmd"].as_i64().unwrap(), o["flags"].as_u64().unwrap());
        let row = cmd_row(p, cmd, flags);
        let user_sum: u64 = mine["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["cmd"] == cmd && x["flags"] == flags)
            .map(|x| x["sum_ns"].as_u64().unwrap())
            .sum();
        let lat = &row["latency_ns"];
        assert!(
            lat["sum"].as_u64().unwrap() <= user_sum,
            "{cmd}: {lat} vs user sum {user_sum}"
        );
        assert!(lat["min"].as_u64().unwrap() > 0);
        assert!(lat["min"].as_u64() <= lat["p50"].as_u64());
        assert!(lat["p50"].as_u64() <= lat["p99"].as_u64());
        assert!(lat["p99"].as_u64() <= lat["max"].as_u64());
        let hist_total: u64 = row["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(hist_total, row["calls"].as_u64().unwrap());
    }
    // GLOBAL waits a grace period (milliseconds): the kernel-side p50 matches the workload's
    // own p50 within the histogram's resolution plus the syscall entry/exit around it.
    let global = mine["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["cmd"] == 1)
        .unwrap();
    let user_p50 = global["p50_ns"].as_u64().unwrap() as f64;
    let row = cmd_row(p, 1, 0);
    assert_eq!(row["kind"], "grace_period");
    let p50 = row["latency_ns"]["p50"].as_u64().unwrap() as f64;
    assert!(
        p50 <= user_p50 * 1.04 && p50 >= user_p50 * 0.9,
        "GLOBAL p50 {p50} vs workload's {user_p50}"
    );
    assert!(row["latency_ns"]["max"].as_u64().unwrap() <= global["max_ns"].as_u64().unwrap());

    // A grace period is spent blocked: off-CPU time is reported, is at most the call's latency,
    // and is most of it; something (an RCU kthread) woke the caller.
    let (blocked, lat) = (
        row["blocked_ns"]["sum"].as_u64().unwrap(),
        row["latency_ns"]["sum"].as_u64().unwrap(),
    );
    assert!(blocked <= lat, "blocked {blocked} > latency {lat}");
    assert!(blocked * 2 > lat, "blocked {blocked} is not most of {lat}");
    assert_eq!(row["on_cpu_ns"].as_u64().unwrap(), lat - blocked);
    assert!(
        row["blocked_ns"]["max"].as_u64().unwrap() <= row["latency_ns"]["max"].as_u64().unwrap()
    );
    let wakeups: u64 = row["woken_by"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(
        wakeups >= 5,
        "each GLOBAL call was woken: {}",
        row["woken_by"]
    );
    // fentry on synchronize_rcu where the kernel allows it, else off-CPU time.
    let source = if fentry_any() { "fentry" } else { "sched" };
    assert_eq!(report["grace_period_source"], source);
}

#[test]
fn command_mode_sees_every_call_and_passes_exit_status() {
    let _machine = require_root();
    let out = run(tracer()
        .args([
            "-o",
            "json",
            "--",
            WORKLOAD,
            "--query",
            "2",
            "--expedited",
            "500",
        ])
        .args(["--threads", "2", "--global", "1", "--exit-code", "3"]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mine = last_json_with(&stdout, "outcomes");
    let report = last_json_with(&stdout, "processes");
    let p = process(&report, mine["pid"].as_u64().unwrap() as u32);
    let missed = assert_counts(&report, p, &mine);
    // Named after exec, not after the tracer that forked it.
    assert_eq!(p["comm"], "membarrier-work");
    assert_eq!(p["calls"].as_u64().unwrap() + missed, 2 + 1 + 500 + 1);
    assert_eq!(p["unregistered_eperm"], 0);
}

#[test]
fn command_mode_follows_every_child_through_pid_wraps_and_no_stranger() {
    let _machine = alone();
    // 4000 pids for 100,000 + 30,000 processes: pids wrap about 30 times, so the command's dead
    // children's pids go to strangers (and the other way round) again and again.
    let _pid_max = Sysctl::set("kernel/pid_max", 4000);
    let stranger = Command::new(WORKLOAD)
        .args(["--name", "stranger", "--fork-children", "30000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run(tracer().args(["-o", "json", "-i", "1", "--"]).args([
        WORKLOAD,
        "--name",
        "followed",
        "--fork-children",
        "100000",
        "--thread-churn",
        "5000",
    ]));
    let stranger = wait_output(stranger);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mine = last_json_with(&stdout, "outcomes");
    assert_eq!(mine["children"], 100_000, "the workload's own count");
    let theirs = last_json_with(&String::from_utf8_lossy(&stranger.stdout), "outcomes");
    assert_eq!(theirs["children"], 30_000, "the stranger ran alongside");
    let report = last_json_with(&stdout, "processes");
    // Every call of the command's processes, exactly: the children's (one QUERY each) and the
    // threads' (one QUERY each, in the parent)...
    // On this 2-CPU machine, with the stranger forking beside it, the tracer's retire pass can
    // fall behind and the stats map fill: those calls are counted, once, as calls without a
    // row (a few hundred of 105,000 in some runs; the retire pass keeping up is issue 9's).
    let (calls, procs) = calls_named(&report, "followed");
    let no_row = report["dropped"]["calls_without_row"].as_u64().unwrap();
    assert_eq!(calls[&0] + no_row, 105_000, "{}", report["dropped"]);
    assert_eq!(calls.len(), 1);
    // ...every process counted once (the parent and its children)...
    assert!(procs <= 100_001 && procs + no_row >= 100_001, "{procs}");
    if no_row == 0 {
        assert_eq!(procs, 100_001);
    }
    // ...and nobody else's; each call is a thread's (the exited threads past the first 32 of
    // a process, and those of processes summed per name, summed).
    for p in report["processes"].as_array().unwrap() {
        assert_eq!(p["comm"], "followed", "a stranger traced: {p}");
        assert_threads_add_up(&report, p);
    }
    assert_eq!(report["dropped"]["total"], no_row, "{}", report["dropped"]);
    assert_eq!(report["missed_calls"], 0);
    assert!(report["exited_processes"].as_u64().unwrap() + no_row >= 100_000);
}

/// A burst of short-lived processes, each making one call: 40,000 at more than 20,000 a second
/// (the workload counts its own rate), then a new process making 500 calls. The stats map
/// holds about 2,900 rows here and the retire pass frees about one row every 17 us while the
/// burst starves it of CPU: before the kernel moved exited processes' rows out at their exit,
/// thousands of calls had no row (and once a whole new process's). Then 25,000 more with the
/// tracer stopped: the kernel sums what its ring has no room for by name, threads with them.
/// Every call is counted, under its process's name, and the new process whole.
#[test]
fn a_burst_of_short_lived_processes_loses_no_call() {
    let _machine = alone();
    // At nice 19, the tracer as starved of CPU as a busy box makes it: with its rings emptied by
    // the retire pass, CI lost 11,900 calls and 1,641 threads' counts once at nice 0, and here
    // at nice 19 520 to 7,769 threads' counts were lost in each of 3 runs.
    let tracer = {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = tracer();
        cmd.args(["-o", "json"]);
        // SAFETY: setpriority on the child itself, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Tracer::spawn(&mut cmd)
    };
    let w = run(Command::new(WORKLOAD).args([
        "--name",
        "mt-burst",
        "--fork-children",
        "40000",
        "--fork-parallel",
        "4",
    ]));
    assert!(w.status.success());
    let own = last_json_with(&String::from_utf8_lossy(&w.stdout), "children");
    assert_eq!(own["children"], 40_000);
    let rate = 40_000.0 / own["children_secs"].as_f64().unwrap();
    // Then a burst with the tracer stopped, starved as no box starves it: the ring fills at
    // about 5,000 processes; the kernel sums the rest by name (CI once lost 23,908 calls at
    // 56,000 processes a second, with the rows of 2,869 processes left in the stats map).
    tracer.signal(libc::SIGSTOP);
    let stopped = run(Command::new(WORKLOAD).args([
        "--name",
        "mt-stopped",
        "--fork-children",
        "25000",
        "--fork-parallel",
        "4",
    ]));
    tracer.signal(libc::SIGCONT);
    assert!(stopped.status.success());
    let after = run(Command::new(WORKLOAD).args(["--name", "mt-after", "--query", "500"]));
    assert!(after.status.success());
    let after_pid = last_json_with(&String::from_utf8_lossy(&after.stdout), "pid")["pid"].clone();
    tracer.signal(libc::SIGINT);
    let (_, report) = tracer.report();
    // How the rows left the kernel says why, if a call was lost.
    let how = format!(
        "{rate:.0} processes a second; dropped {}; exited rows {}",
        report["dropped"], report["exited_rows"]
    );
    assert_eq!(
        report["dropped"]["total"], 0,
        "{how}: {}",
        report["dropped"]
    );
    let (calls, procs) = calls_named(&report, "mt-burst");
    assert_eq!(calls, [(0, 40_000)].into(), "{how}");
    assert_eq!(procs, 40_000);
    assert_eq!(
        calls_named(&report, "mt-stopped"),
        ([(0, 25_000)].into(), 25_000),
        "{how}"
    );
    // ...with its thread: every call is a thread's (CI once lost 14,953 threads' counts, held
    // in a full THREADS map for processes the kernel had summed, whose rows would never have
    // been retired).
    for p in report["processes"].as_array().unwrap() {
        if p["comm"] == "mt-burst" || p["comm"] == "mt-stopped" {
            assert_threads_add_up(&report, p);
        }
    }
    // The kernel summed most of the stopped burst; the rest of the processes that found the
    // ring full (one whose thread's row got in before the ring filled) stayed whole.
    // More than THREADS holds (16,384): summed, they take none of it.
    let summed = report["exited_rows"]["summed_by_name"].as_u64().unwrap();
    assert!(summed > 16_384, "{how}");
    assert!(
        report["exited_rows"]["ring_full"].as_u64().unwrap() >= summed,
        "{how}"
    );
    assert_eq!(calls_named(&report, "mt-after"), ([(0, 500)].into(), 1));
    // The busiest exited process keeps its own entry, though 40,000 exited before it: the
    // one-call processes are the ones summed by name (it was once the first 1,024 kept).
    let p = process(&report, after_pid.as_u64().unwrap() as u32);
    assert_eq!(
        (&p["comm"], &p["exited"]),
        (&json!("mt-after"), &json!(true))
    );
    assert!(report["exited_summed"].as_u64().unwrap() >= 65_000 - 1024);
    // Last: the burst ran its children in parallel, not one after another (which would not
    // test the claim). Traced, this VM makes 19,900 to 30,000 a second with the machine's
    // phase (20,000 was once the floor here, and a slow hour failed it at 19,929); one child at
    // a time, untraced, about 4,500. The stopped burst fills the ring whatever the rate.
    assert!(rate >= 10_000.0, "only {rate:.0} processes a second");
    eprintln!("burst: {how}, every call counted");
}

#[test]
fn system_wide_sees_new_processes_after_thousands_have_exited() {
    let _machine = alone();
    let tracer = Tracer::start(&["-o", "json", "--no-breakdown"]);
    // More processes than the stats map has rows: only freeing exited ones lets the last in.
    let w = run(Command::new(WORKLOAD).args(["--name", "sysw-churn", "--fork-children", "12000"]));
    assert!(w.status.success());
    tracer.signal(libc::SIGINT);
    let (_, report) = tracer.report();
    let (calls, procs) = calls_named(&report, "sysw-churn");
    assert_eq!(calls, [(0, 12_000)].into(), "{}", report["dropped"]);
    assert_eq!(procs, 12_000);
    assert_eq!(report["dropped"]["calls_without_row"], 0);
}

#[test]
fn a_full_inflight_map_counts_each_call_it_loses_once() {
    let _machine = alone();
    // Each thread maps a stack and a signal stack, with guard pages: more than the default 65,530.
    let _maps = Sysctl::set("vm/max_map_count", 262_144);
    // At most two tids per place in TID_SLOTS (16,384 places), so at most half the threads
    // need the INFLIGHT hash when the places are used.
    let _pids = Sysctl::set("kernel/pid_max", 32_768);
    // Without the places (as on kernels before 5.12), then with them.
    for places in [false, true] {
        let mut w = Workload::start(&["--name", "wide", "--live-threads", "17000"]);
        let tracer = {
            // INFLIGHT is sized from kernel.threads-max at load, 16384 slots at the least: load
            // with that, then give the machine its threads back for the workload's 17,000.
            let _threads = Sysctl::set("kernel/threads-max", 16384);
            let mut t = tracer();
            if !places {
                t.env("MEMBARRIER_TRACE_NO_TID_SLOTS", "1");
            }
            Tracer::spawn(t.args(["-o", "json", "--pid", &w.pid.to_string()]))
        };
        w.go();
        let pid = w.pid;
        let mine = w.finish();
        assert_eq!(mine["threads"], 17_000);
        let (_, report) = tracer.report();
        let query = cmd_row(process(&report, pid), 0, 0)["calls"]
            .as_u64()
            .unwrap();
        let dropped = &report["dropped"];
        let lost = if places {
            // 17,000 tids take at least 8,500 places: at most 8,500 threads go to the hash.
            0
        } else {
            // Each thread holds its slot until it exits, and none exits before all have
            // called: the first 16,384 calls are counted, the rest each once as a call
            // without a slot.
            17_000 - 16_384
        };
        assert_eq!(query, 17_000 - lost, "places {places}: {dropped}");
        assert_eq!(
            dropped["calls_without_inflight_slot"], lost,
            "places {places}"
        );
        assert_eq!(dropped["total"], lost, "places {places}");
        assert_eq!(report["missed_calls"], 0, "not also counted as missed");
    }
}

/// Two processes whose pids share a place in TID_SLOTS (pid mod 16,384), calling at once: the
/// thread that calls first has its slot in the array, the other in the INFLIGHT hash, and every
/// call of both is counted, also after the first to finish frees its slot.
#[test]
fn threads_sharing_a_place_are_each_counted_exactly() {
    let _machine = alone();
    let _pids = Sysctl::set("kernel/pid_max", 32_768);
    let args = ["--expedited", "200000"];
    let first = Workload::start(&args);
    let want = (first.pid + 16_384) % 32_768;
    // The next fork gets ns_last_pid + 1 when it is free; another process forking meanwhile
    // takes it first, so a few tries.
    let second = (0..50)
        .find_map(|_| {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string()).unwrap();
            let w = Workload::start(&args);
            if w.pid == want {
                Some(w)
            } else {
                w.kill();
                None
            }
        })
        .unwrap_or_else(|| panic!("no process got pid {want} in 50 tries"));
    assert_eq!(first.pid % 16_384, second.pid % 16_384);
    let (_, report, own) = trace_pids(vec![first, second], vec![]);
    for (pid, mine) in &own {
        let p = process(&report, *pid);
        assert_eq!(assert_counts(&report, p, mine), 0, "{pid}: none missed");
    }
    assert_eq!(report["dropped"]["total"], 0, "{}", report["dropped"]);
}

#[test]
fn a_rename_just_before_exit_names_the_process() {
    let _machine = require_root();
    // No report while it runs (no -i): only the kernel saw the new name.
    let out = run(tracer().args(["-o", "json", "--"]).args([
        WORKLOAD,
        "--name",
        "before-rename",
        "--query",
        "3",
        "--rename",
        "after-rename",
    ]));
    let report = report_of(&out);
    let (calls, procs) = calls_named(&report, "after-rename");
    assert_eq!(
        (calls, procs),
        ([(0, 4)].into(), 1),
        "{}",
        report["processes"]
    );
}

/// Processes renamed just before they exit, among a churn of short-lived ones, system-wide:
/// each is named as it exited. The kernel keeps a process's name at its main thread's exit in
/// an LRU of 4,096; the churn's names, which nothing read once its rows went out at exit,
/// filled it, and evicted the names of processes left whole for the retire pass before that
/// pass read them: 59 to 92 of 300 renamed processes were named by their old name here (the
/// 1-minute soak, 1 of 57 once).
#[test]
fn renamed_processes_among_a_churn_are_named_as_they_exited() {
    let _machine = alone();
    let tracer = Tracer::start(&["-o", "json"]);
    let churn = |n: &str| {
        Command::new(WORKLOAD)
            .args([
                "--name",
                "mt-churn",
                "--fork-children",
                n,
                "--fork-parallel",
                "4",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    // More processes than the LRU holds, then more alongside the renamed ones.
    assert!(wait_output(churn("10000")).status.success());
    let alongside = Killed(churn("10000000"));
    const RENAMED: u64 = 200;
    for _ in 0..RENAMED {
        let w = run(Command::new(WORKLOAD).args([
            "--name",
            "mt-rn-before",
            "--query",
            "3",
            "--rename",
            "mt-rn-after",
        ]));
        assert!(w.status.success());
    }
    drop(alongside);
    tracer.signal(libc::SIGINT);
    let (_, report) = tracer.report();
    assert_eq!(
        calls_named(&report, "mt-rn-after"),
        ([(0, 4 * RENAMED)].into(), RENAMED),
        "{}",
        report["dropped"]
    );
    assert_eq!(calls_named(&report, "mt-rn-before").1, 0);
}

/// The tracer reading its maps on the CPU where the traced process calls, 100 times a second.
/// Each map syscall holds the CPU's `bpf_prog_active` while it runs, and the kernel skips every
/// syscall-tracepoint program that starts on that CPU meanwhile: were the tracer preempted
/// there (PREEMPT_RT kernels preempt syscalls), the caller's calls would be skipped until it ran
/// again. Every call must still be counted, none missed or skipped.
#[test]
fn snapshots_on_the_callers_cpu_lose_no_call() {
    let _machine = alone();
    let mut w = Workload::start(&["--steady-secs", "3", "--cpu", "0"]);
    let pid = w.pid.to_string();
    let tracer = Tracer::start_on_cpu(&["-o", "json", "-i", "0.01", "--pid", &pid], 0);
    w.go();
    let own = w.finish();
    let (_, report) = tracer.report();
    let p = process(&report, pid.parse().unwrap());
    let steady: u64 = own["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["cmd"] == 8)
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert!(steady > 10_000, "{own}");
    assert_eq!(
        (
            cmd_row(p, 8, 0)["calls"].as_u64().unwrap(),
            report["missed_calls"].as_u64().unwrap(),
            report["dropped"]["hook_runs_skipped"].as_u64().unwrap()
        ),
        (steady, 0, 0),
        "{}",
        report["dropped"]
    );
}
