//! Where a call's time goes: IPIs and their victims, mutex wait, the grace period, findings.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::common::*;

#[test]
fn ipis_go_to_the_running_sibling_and_not_for_a_lone_thread() {
    let _machine = require_root();
    const N: u64 = 5000;
    let mut pair = Workload::start(&["--spinner-calls", &N.to_string()]);
    let mut lone = Workload::start(&["--expedited", &N.to_string()]);
    let (pair_pid, lone_pid) = (pair.pid, lone.pid);
    // One after the other: on a 2-CPU guest the lone caller running beside the pair took the
    // spinner's CPU (326 IPIs in 5000 calls, once).
    let (p, l) = (pair_pid.to_string(), lone_pid.to_string());
    let tracer = Tracer::start(&["-o", "json", "--pid", &p, "--pid", &l]);
    pair.go();
    pair.finish();
    lone.go();
    lone.finish();
    let (_, report) = tracer.report();

    let row = cmd_row(process(&report, pair_pid), 8, 0);
    assert_eq!(row["calls"], N);
    let ipis = &row["ipis"];
    let sent = ipis["sent"].as_u64().unwrap();
    // The sibling spins on the last CPU, the caller is pinned to CPU 0 and calls only once it
    // has seen the sibling run: each call finds it running and sends it one IPI, but for the
    // rare preemption between the look and the call (5000 of 5000 here, also beside stress-ng).
    assert!((N * 9 / 10..=N).contains(&sent), "{ipis}");
    let last_cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    let per_cpu = ipis["per_cpu"].as_object().unwrap();
    assert_eq!(
        per_cpu.keys().collect::<Vec<_>>(),
        vec![&last_cpu],
        "{ipis}"
    );
    assert_eq!(per_cpu[&last_cpu], sent);
    let per_call = ipis["per_call"].as_array().unwrap();
    let calls: u64 = per_call.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    let weighted: u64 = per_call
        .iter()
        .map(|b| b["count"].as_u64().unwrap() * b["ipis"].as_u64().unwrap())
        .sum();
    assert_eq!(calls, N);
    assert_eq!(weighted, sent);
    assert!(ipis["handler_ns"].as_u64().unwrap() > 0, "{ipis}");
    // Whose work the handlers interrupted: the pair's own spinner, one handler run per IPI.
    let victims = ipis["victims"].as_array().unwrap();
    assert_eq!(victims[0]["pid"], pair_pid, "{ipis}");
    assert!(
        victims[0]["interrupts"].as_u64().unwrap() >= sent * 9 / 10,
        "{ipis}"
    );
    assert!(sum_of(&ipis["victims"], "interrupts") <= sent, "{ipis}");
    assert_eq!(
        sum_of(&ipis["victims"], "handler_ns"),
        ipis["handler_ns"].as_u64().unwrap()
    );
    // What its calls cost: their on-CPU time and the handler time they caused, summed.
    let p = process(&report, pair_pid);
    let sum = |f: &dyn Fn(&Value) -> u64| p["cmds"].as_array().unwrap().iter().map(f).sum::<u64>();
    assert_eq!(
        p["cpu_ns"]["ipi_handler"].as_u64().unwrap(),
        sum(&|c| c["ipis"]["handler_ns"].as_u64().unwrap())
    );
    assert_eq!(
        p["cpu_ns"]["caller"].as_u64().unwrap(),
        sum(&|c| c["on_cpu_ns"].as_u64().unwrap())
    );

    // One thread alone in its mm: the kernel skips the IPIs (mm_users == 1). Not always zero
    // here: anything that briefly takes a reference on the mm (a /proc/PID/stat reader such as
    // ps or the VM's agent) makes the kernel take the IPI path for calls in that window, and
    // one that migrates mid-call then IPIs the CPU it left. Seen: 0 to 2 in 5000.
    let lone_row = cmd_row(process(&report, lone_pid), 8, 0);
    assert_eq!(lone_row["calls"], N);
    let lone_sent = lone_row["ipis"]["sent"].as_u64().unwrap();
    assert!(lone_sent <= N / 100, "{}", lone_row["ipis"]);
    assert!(lone_sent * 50 < sent, "lone {lone_sent} vs pair {sent}");
}

#[test]
fn concurrent_expedited_callers_wait_for_the_mutex() {
    let _machine = require_root();
    // Whether two calls meet at the mutex is up to the scheduler: a PREEMPT_RT guest under
    // TCG once ran 80,000 calls without one wait. Up to three rounds, each checked in full.
    let mut waits = Vec::new();
    let lock_tracepoints =
        membarrier_trace::collect::kernel::Features::of_this_kernel().lock_contention;
    for _round in 0..3 {
        let args = ["--expedited", "20000", "--threads", "2"];
        let (a, b) = (Workload::start(&args), Workload::start(&args));
        let pids = [a.pid, b.pid];
        let (out, report, _) = trace_pids(vec![a, b], vec![]);
        if !lock_tracepoints {
            // Before 5.19 (the 5.10 guest): no mutex figures, said once, none made up.
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.matches("no mutex wait figures: ").count(), 1, "{err}");
            for &pid in &pids {
                let row = cmd_row(process(&report, pid), 8, 0);
                assert_eq!(
                    row["mutex_wait_ns"]["sum"].as_u64().unwrap_or(0),
                    0,
                    "{row}"
                );
            }
            return;
        }
        for &pid in &pids {
            let row = cmd_row(process(&report, pid), 8, 0);
            let m = &row["mutex_wait_ns"];
            assert!(m["max"].as_u64() <= m["sum"].as_u64());
            assert!(m["sum"].as_u64().unwrap() <= row["latency_ns"]["sum"].as_u64().unwrap());
            waits.push(m["sum"].as_u64().unwrap());
        }
        if waits.iter().any(|&w| w > 0) {
            return;
        }
    }
    panic!("no mutex wait in three rounds: {waits:?}");
}

/// Findings: each rule fires on a workload with its pitfall, with the evidence and cost in
/// numbers, and stays quiet on a healthy workload near its threshold.
#[test]
fn findings_fire_on_pitfalls_and_not_on_healthy_workloads() {
    let _machine = require_root();
    let cases: [(&[&str], Option<&str>); 6] = [
        // Registered after starting its threads: the registration waits for a grace period.
        // (One call a thread: more, back to back, would also queue on the kernel's mutex.)
        (
            &["--expedited", "2", "--threads", "2", "--register-late"],
            Some("late_registration"),
        ),
        // The same calls, registered while single-threaded: microseconds.
        (&["--expedited", "2", "--threads", "2"], None),
        (&["--eperm", "5"], Some("unregistered_eperm")),
        (&["--expedited", "5"], None),
        // GLOBAL in a loop: the process spends its life waiting for grace periods.
        (&["--global", "30"], Some("global_rate")),
        // One call under the count threshold.
        (&["--global", "9"], None),
    ];
    for (args, rule) in cases {
        let out = run(tracer()
            .args(["-o", "json", "--no-rcu", "--"])
            .arg(WORKLOAD)
            .args(args));
        let report = report_of(&out);
        let own = last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes");
        let findings = report["findings"].as_array().unwrap();
        let rules: Vec<&str> = findings
            .iter()
            .map(|f| f["rule"].as_str().unwrap())
            .collect();
        let Some(rule) = rule else {
            assert!(rules.is_empty(), "{args:?}: {findings:#?}");
            continue;
        };
        assert_eq!(rules, [rule], "{args:?}: {findings:#?}");
        let f = &findings[0];
        assert_eq!(f["pid"], own["pid"], "{f:#}");
        assert!(f["fix"].as_str().unwrap().len() > 20, "{f:#}");
        assert!(
            f["reference"].as_str().unwrap().contains("membarrier.c"),
            "{f:#}"
        );
        match rule {
            "late_registration" => {
                assert_eq!(f["evidence"]["cmd"], "REGISTER_PRIVATE_EXPEDITED");
                assert!(
                    f["evidence"]["latency_max_ns"].as_u64().unwrap() >= 1_000_000,
                    "{f:#}"
                );
                assert!(f["cost"]["time_ns"].as_u64().unwrap() >= 1_000_000, "{f:#}");
            }
            "unregistered_eperm" => {
                assert_eq!(f["severity"], "critical");
                assert_eq!(f["evidence"]["eperm"], 5);
                assert_eq!(f["cost"]["calls"], 5);
            }
            "global_rate" => {
                assert_eq!(f["evidence"]["calls"], 30);
                assert!(
                    f["evidence"]["share_of_run_pct"].as_f64().unwrap() >= 10.0,
                    "{f:#}"
                );
            }
            _ => unreachable!(),
        }
    }
}

/// Two processes of two threads each calling PRIVATE_EXPEDITED back to back, a thread of each
/// on each CPU, queue on the kernel's mutex (32-46% of their call time, 6 runs): a finding
/// for each, naming both; one caller never waits (a single-threaded process's call returns
/// before the mutex). With fewer calls (20,000) a process sometimes finished its calls within
/// a few ms, before the other got going, without waiting.
#[test]
fn mutex_contention_names_the_callers_and_a_lone_caller_has_none() {
    // Alone: beside another test's spinner (SCHED_FIFO on the last CPU) the threads pinned
    // there hardly ran, and the processes waited 7-14% of their call time (2 runs of 6).
    let _machine = alone();
    let w = WORKLOAD;
    let out = run(tracer()
        .args(["-o", "json", "--no-rcu", "--", "sh", "-c"])
        .arg(format!(
            "{w} --expedited 200000 --threads 2 --pin-threads --name mutex-a & \
         {w} --expedited 200000 --threads 2 --pin-threads --name mutex-b; wait"
        )));
    let report = report_of(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("outcomes").is_some())
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    let findings = report["findings"].as_array().unwrap();
    for pid in &pids {
        let f = findings
            .iter()
            .find(|f| f["rule"] == "mutex_contention" && f["pid"] == *pid)
            .unwrap_or_else(|| panic!("no mutex_contention for {pid}: {findings:#?}"));
        let e = &f["evidence"];
        assert_eq!(e["cmd"], "PRIVATE_EXPEDITED", "{f:#}");
        assert_eq!(e["calls"], 200000, "{f:#}");
        assert_eq!(e["threads"], 2, "{f:#}");
        assert!(e["share_pct"].as_f64().unwrap() >= 10.0, "{f:#}");
        assert_eq!(f["cost"]["time_ns"], e["mutex_wait_ns"], "{f:#}");
        let row = cmd_row(process(&report, *pid as u32), 8, 0);
        assert_eq!(e["mutex_wait_ns"], row["mutex_wait_ns"]["sum"], "{f:#}");
        // Releasing the mutex wakes the waiter, which may take an IPI of its own: not
        // membarrier's. A call reaches at most every other CPU.
        let cpus = std::thread::available_parallelism().unwrap().get() as u64;
        for b in row["ipis"]["per_call"].as_array().unwrap() {
            assert!(b["ipis"].as_u64().unwrap() < cpus, "{}", row["ipis"]);
        }
        let mut callers: Vec<u64> = e["callers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["pid"].as_u64().unwrap())
            .collect();
        callers.sort_unstable();
        let mut want = pids.clone();
        want.sort_unstable();
        assert_eq!(callers, want, "{f:#}");
    }
    // Their IPIs to each other may also be a storm (12,600 a second to each CPU, once).
    assert!(
        findings
            .iter()
            .all(|f| f["rule"] == "mutex_contention" || f["rule"] == "ipi_storm"),
        "{findings:#?}"
    );

    let out = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--expedited", "20000"]));
    let report = report_of(&out);
    let row = cmd_row(&report["processes"][0], 8, 0);
    assert_eq!(row["calls"], 20000);
    assert_eq!(row["mutex_wait_ns"]["sum"], 0, "{row:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
}

/// GLOBAL_EXPEDITED in a loop from CPU 0 against a registered process spinning on the other
/// CPU: an `ipi_storm` naming that process as the victim, with its interrupts and handler
/// time; the same calls paced under the threshold make none.
#[test]
fn ipi_storm_names_the_victim_and_a_paced_caller_has_none() {
    // Alone: the victim spins pinned to a CPU the other tests would want.
    let _machine = alone();
    let mut victim = Killed(
        Command::new(WORKLOAD)
            .args(["--victim-secs", "30", "--name", "victim"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(victim.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let victim_pid: u64 = line
        .strip_prefix("victim ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("victim said {line:?}"));
    let storm = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--global-expedited", "50000"]));
    // At most 8,000 a second: under the threshold of 10,000 to one CPU.
    let paced = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--global-expedited", "4000", "--rate", "8000"]));
    drop(victim);

    let report = report_of(&storm);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["rule"], "ipi_storm", "{f:#}");
    assert_eq!(f["pid"], report["processes"][0]["pid"], "{f:#}");
    let e = &f["evidence"];
    assert_eq!(e["cmd"], "GLOBAL_EXPEDITED", "{f:#}");
    assert_eq!(e["calls"], 50000, "{f:#}");
    let last_cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    assert!(
        e["ipis_per_sec_per_cpu"][&last_cpu].as_f64().unwrap() >= 10_000.0,
        "{f:#}"
    );
    let v = &e["victims"][0];
    assert_eq!(v["pid"], victim_pid, "{f:#}");
    assert_eq!(v["comm"], "victim", "{f:#}");
    // Not every call finds it running (the tracer's threads and kernel threads share its CPU:
    // 9,841 of 50,000 once), but it takes most of the interrupts.
    let all = sum_of(&e["victims"], "interrupts");
    assert!(v["interrupts"].as_u64().unwrap() * 2 > all, "{f:#}");
    assert!(v["handler_ns"].as_u64().unwrap() > 0, "{f:#}");
    let row = cmd_row(&report["processes"][0], 2, 0);
    assert_eq!(f["cost"]["ipis"], row["ipis"]["sent"], "{f:#}");
    assert_eq!(row["ipis"]["victims"][0]["pid"], victim_pid);

    let report = report_of(&paced);
    let row = cmd_row(&report["processes"][0], 2, 0);
    assert_eq!(row["calls"], 4000);
    // It did interrupt the victim, only not often enough to be a storm.
    assert!(row["ipis"]["sent"].as_u64().unwrap() >= 2000, "{row:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
}

/// GLOBAL where the kernel cannot wait for a grace period: with nohz_full CPUs it fails with
/// EINVAL (a critical `global_unavailable`), with one CPU online it returns at once (a warning);
/// with the CPUs back, the same calls wait and make no finding. It takes CPUs offline and
/// needs a kernel booted with nohz_full: `cargo xtask vmtest` runs it in its guests (the
/// cloud kernel, and the same booted with `nohz_full=1`).
#[test]
#[ignore = "takes a CPU offline: runs in cargo xtask vmtest's guests"]
fn global_unavailable_where_the_kernel_cannot_wait() {
    let _machine = alone();
    let global = |n: &str| {
        let out = run(tracer()
            .args(["-o", "json", "--no-rcu", "--"])
            .arg(WORKLOAD)
            .args(["--global", n]));
        report_of(&out)
    };
    let nohz_full = std::fs::read_to_string("/sys/devices/system/cpu/nohz_full")
        .unwrap_or_default()
        .trim()
        .to_string();
    let booted_nohz = std::fs::read_to_string("/proc/cmdline")
        .unwrap()
        .contains("nohz_full=");
    let nohz = !nohz_full.is_empty() && nohz_full != "(null)";
    assert_eq!(nohz, booted_nohz, "nohz_full is {nohz_full:?}");
    if nohz {
        let report = global("5");
        let row = cmd_row(&report["processes"][0], 1, 0);
        assert_eq!(row["errno"]["EINVAL"], 5, "{row:#}");
        let findings = report["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let f = &findings[0];
        assert_eq!(f["rule"], "global_unavailable", "{f:#}");
        assert_eq!(f["severity"], "critical", "{f:#}");
        assert_eq!(f["evidence"]["einval"], 5, "{f:#}");
        assert_eq!(f["evidence"]["nohz_full"], nohz_full, "{f:#}");
        return;
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(cpus >= 2, "needs 2 CPUs to take one offline");
    {
        // Every CPU but 0 offline, back online on drop.
        let _offline: Vec<Sysctl> = (1..cpus)
            .map(|c| Sysctl::file(&format!("/sys/devices/system/cpu/cpu{c}/online"), "0"))
            .collect();
        let report = global("5");
        let findings = report["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let f = &findings[0];
        assert_eq!(f["rule"], "global_unavailable", "{f:#}");
        assert_eq!(f["severity"], "warning", "{f:#}");
        assert_eq!(f["evidence"]["calls"], 5, "{f:#}");
        assert_eq!(f["evidence"]["cpus_online"], 1, "{f:#}");
        // No grace period: nothing to block on.
        assert_eq!(f["evidence"]["blocked_ns"], 0, "{f:#}");
    }
    let report = global("5");
    let row = cmd_row(&report["processes"][0], 1, 0);
    assert_eq!(row["calls"], 5);
    assert_eq!(row["errors"], 0);
    assert_eq!(report["findings"], serde_json::json!([]));
}
