//! `membarrier-trace calibrate`.

use crate::common::*;

/// `calibrate` runs every scenario with the calls it asked for, none failing; the IPIs per call
/// follow the siblings running (none alone, one per sibling); and its figure for one sibling
/// agrees with what the tracer measures for the same workload (the spinner pair).
#[test]
fn calibrate_measures_each_cmd_and_agrees_with_the_tracer() {
    // A measurement of this host's costs: on a quiet machine, as calibrate is meant to be run
    // (beside the other tests, twice in four CI runs the 1-sibling scenario had 1,001 and
    // 1,002 IPIs in 1,000 calls; alone, 10 runs of 10 had 1,000: see the session-8 note).
    let _machine = alone();
    let out = run(tracer().args(["calibrate", "--calls", "4000", "-o", "json"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = last_json_with(&String::from_utf8_lossy(&out.stdout), "calibration");
    let rows = v["calibration"].as_array().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name}: {rows:#?}"))
    };
    // 2 + (cpus - 1) sibling counts + 3 more expedited + GLOBAL + 2 registrations.
    assert_eq!(
        rows.len() as u64,
        2 + (cpus - 1).min(7) + 3 + 3,
        "{rows:#?}"
    );
    for r in rows {
        let name = r["scenario"].as_str().unwrap();
        let want = if name.starts_with("REGISTER_") {
            10
        } else if name.starts_with("GLOBAL (") {
            20
        } else if r["siblings"].as_u64().unwrap() > 0 {
            1000
        } else {
            4000
        };
        assert_eq!(r["calls"], want, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(
            r["p50_ns"].as_u64().unwrap() <= r["p99_ns"].as_u64().unwrap(),
            "{r}"
        );
    }
    assert_eq!(row("PRIVATE_EXPEDITED, one thread")["ipis_per_call"], 0.0);
    for k in 1..cpus.min(8) {
        let r = row(&format!(
            "PRIVATE_EXPEDITED, {k} sibling{} running",
            if k == 1 { "" } else { "s" }
        ));
        let per_call = r["ipis_per_call"].as_f64().unwrap();
        assert!(per_call >= k as f64 * 0.9 && per_call <= k as f64, "{r}");
        assert!(r["handler_ns_per_ipi"].as_u64().unwrap() > 0, "{r}");
    }
    // A registration in a process with a second thread waits for a grace period; alone it
    // does not.
    let (alone, two) = (
        row("REGISTER_PRIVATE_EXPEDITED, one thread")["p50_ns"]
            .as_u64()
            .unwrap(),
        row("REGISTER_PRIVATE_EXPEDITED, two threads")["p50_ns"]
            .as_u64()
            .unwrap(),
    );
    assert!(two > alone * 10, "alone {alone} ns, two threads {two} ns");

    // The tracer on the spinner pair (one sibling running) measures the same cost per call,
    // within 3x: on this VM the cost of an IPI to a running sibling is bimodal per process,
    // tracer or not (the workload untraced, 6 runs: 13.2 to 26.3 us a call, in two modes near
    // 13 and 25; calibrate, 14 runs: p50 12.0 to 27.1 us, with a SCHED_FIFO sibling too), so
    // two runs a few seconds apart can be 2.4x apart. A scenario without its IPI (a sibling
    // not running) costs a tenth: still far outside.
    let mut pair = Workload::start(&["--spinner-calls", "4000"]);
    let pair_pid = pair.pid;
    let tracer = Tracer::start(&["-o", "json", "--pid", &pair_pid.to_string()]);
    pair.go();
    pair.finish();
    let (_, report) = tracer.report();
    let traced = cmd_row(process(&report, pair_pid), 8, 0);
    let cal = row("PRIVATE_EXPEDITED, 1 sibling running");
    let (a, b) = (
        traced["latency_ns"]["p50"].as_f64().unwrap(),
        cal["p50_ns"].as_f64().unwrap(),
    );
    assert!(
        a < b * 3.0 && b < a * 3.0,
        "traced p50 {a} ns, calibrate {b} ns"
    );
}
