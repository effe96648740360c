//! `--stacks`: callers' stacks, unwound with and without frame pointers, sampled above the rate.

use serde_json::Value;

use crate::common::*;

/// --stacks on the two liburcu writers, built without and with frame pointers: every
/// PRIVATE_EXPEDITED call is attributed to a stack unwound to the thread's start, and the
/// stacks through each writer function hold at least its two calls per synchronize_rcu().
#[test]
fn stacks_of_liburcu_writers_without_and_with_frame_pointers() {
    let _machine = require_root();
    for (name, flags) in [
        ("urcu_writers", &["-lurcu-memb"][..]),
        (
            "urcu_writers_fp",
            &["-lurcu-memb", "-fno-omit-frame-pointer"][..],
        ),
    ] {
        let bin = build_urcu_program("urcu_writers", name, flags);
        // A pause between grace periods keeps the calls under the exact stack rate; 600 ms of
        // them, so the kernel unwinds them once the first retire pass (250 ms) taught it.
        let mut prog = UrcuWriters::start(&bin, &["600", "400", "1000"]);
        let pid_arg = prog.pid.to_string();
        // With the grace-period probes (the default): their uretprobe puts its trampoline in
        // place of synchronize_rcu()'s return address, which the unwinding must see through.
        let tracer = Tracer::spawn(
            tracer()
                .env("MEMBARRIER_TRACE_DEBUG_RULES", "1")
                .args(["-o", "json", "-p", &pid_arg, "--stacks"]),
        );
        let own = prog.run();
        prog.finish();
        let (out, report) = tracer.report();
        assert_eq!(
            report["dropped"]["total"],
            0,
            "{name}: {}; stderr: {}",
            report["dropped"],
            String::from_utf8_lossy(&out.stderr)
        );
        let p = &report["processes"][0];
        let pe = p["cmds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cmd"] == "PRIVATE_EXPEDITED")
            .unwrap_or_else(|| panic!("{name}: {p:#}"));
        let stacks = pe["stacks"].as_array().unwrap();
        assert_eq!(pe["unattributed"], 0, "{name}");
        let calls: u64 = stacks.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
        assert_eq!(calls, pe["calls"].as_u64().unwrap(), "{name}: {stacks:#?}");
        for s in stacks {
            assert_eq!(s["estimated"], false, "{name}: {s:#}");
        }
        let names = |s: &Value| -> Vec<String> {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
                .collect()
        };
        for (function, _, _, n, _) in &own {
            let through: Vec<&Value> = stacks
                .iter()
                .filter(|s| names(s).contains(function))
                .collect();
            let calls: u64 = through.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
            assert!(
                calls >= 2 * n,
                "{name}: {function}: {calls} calls for {n} grace periods: {stacks:#?}"
            );
            // Unwound in userspace first, then by the kernel, into the same stacks: a kernel
            // that found other frames or stopped elsewhere would make stacks of its own.
            let in_kernel = |s: &Value| s["unwound_in_kernel"].as_u64().unwrap();
            assert!(
                through
                    .iter()
                    .any(|s| in_kernel(s) > 0 && in_kernel(s) < s["calls"].as_u64().unwrap()),
                "{name}: {function}: {stacks:#?}"
            );
            for s in through {
                let f = names(s);
                // The syscall, liburcu, the writer, then its thread's start, to the outermost.
                assert_eq!(f[0], "syscall", "{name}: {f:?}");
                let at = f.iter().position(|x| x == function).unwrap();
                assert!(
                    f[..at]
                        .iter()
                        .any(|x| x.starts_with("urcu_memb_synchronize_rcu")),
                    "{name}: {f:?}"
                );
                assert_eq!(f[at + 1], "run", "{name}: {f:?}");
                assert_eq!(s["truncated"], false, "{name}: {f:?}");
                assert!(
                    s["frames"][at]["module"].as_str().unwrap().ends_with(name),
                    "{name}: {s:#}"
                );
            }
        }
    }
}

/// --stacks above the exact rate: a second of full-speed PRIVATE_EXPEDITED calls from one
/// call site gets sampled stacks, marked estimates, that with the calls nothing could be sent
/// for still add up to every call. Its one stack is unwound in userspace from the first
/// samples, then by the kernel with the rules learned from them, and both count into it.
#[test]
fn stacks_above_the_rate_are_sampled_and_add_up() {
    let _machine = require_root();
    // The lowest rate (one exact stack per CPU per 10 ms), so that sampling starts on any
    // machine: a guest sharing the host with another makes as few as 9,500 calls a second,
    // under the default 10,000.
    let out = run(tracer()
        .args([
            "-o",
            "json",
            "--stacks",
            "--stack-rate",
            "100",
            "--no-rcu",
            "--",
        ])
        .arg(WORKLOAD)
        .args(["--steady-secs", "1"]));
    let report = report_of(&out);
    let own = last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes");
    let expected = workload_counts(&own)[&(8, 0, String::new())];
    assert!(expected > 1_000, "{own}");
    let pe = report["processes"][0]["cmds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cmd"] == "PRIVATE_EXPEDITED")
        .unwrap()
        .clone();
    assert_eq!(pe["calls"], expected);
    let kernel = membarrier_trace::collect::kernel::Features::of_this_kernel();
    if !kernel.task_pt_regs {
        // Before Linux 5.15 (the 5.10 guest): the run goes on without stacks, saying so once.
        let err = String::from_utf8_lossy(&out.stderr);
        let line = format!(
            "--stacks off: it needs bpf_task_pt_regs (Linux 5.15), this is {}",
            kernel.name()
        );
        assert_eq!(err.matches(&line).count(), 1, "{err}");
        assert!(pe["stacks"].as_array().is_none_or(|s| s.is_empty()), "{pe}");
        return;
    }
    let stacks = pe["stacks"].as_array().unwrap();
    let calls: u64 = stacks.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
    let unattributed = pe["unattributed"].as_u64().unwrap();
    assert_eq!(calls + unattributed, expected, "{stacks:#?}");
    assert!(stacks.iter().any(|s| s["estimated"] == true), "{stacks:#?}");
    // One call site, one stack: the kernel's frames are the ones userspace found. The kernel
    // unwinds it unless it runs past the bytes a sample copies: a main thread near the top of
    // its stack (the RT guest's small environment), which userspace sees truncated there.
    assert_eq!(stacks.len(), 1, "{stacks:#?}");
    assert_eq!(
        stacks[0]["unwound_in_kernel"].as_u64().unwrap() > 0,
        stacks[0]["truncated"] == false,
        "{stacks:#?}"
    );
    let top = &stacks[0]["frames"];
    assert!(
        top.as_array()
            .unwrap()
            .iter()
            .any(|f| f["symbol"] == "membarrier_workload::call"),
        "{top:#}"
    );
}
