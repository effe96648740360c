//! The exporter against a real Prometheus server and promtool.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::*;

/// Percent-encodes a PromQL query for a URL.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback scraping `target` every second, in its own directory; killed
/// on drop.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        Self::start_with(target, &[])
    }

    /// With more options: `--enable-feature=native-histograms`.
    fn start_with(target: &str, options: &[&str]) -> Prometheus {
        // A private directory (0700, a random name): root writes no file at a name others know.
        let tmp = tempfile::Builder::new()
            .prefix("mt-prometheus-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: membarrier\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .args(options)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running prometheus (cargo xtask test installs Debian's package)");
        let p = Prometheus {
            child,
            addr,
            _dir: tmp,
        };
        let until = Instant::now() + TIMEOUT;
        while http_get(&p.addr, "/-/ready", "*/*").is_none_or(|(code, _)| code != 200) {
            assert!(Instant::now() < until, "prometheus not ready: {}", p.log());
            thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// An instant query's result vector: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (code, body) = http_get(&self.addr, &path, "*/*").expect("prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, 200, "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `promql` (a single series) until it equals `want`; returns what it last read.
    fn wait_for(&self, promql: &str, want: f64) -> Option<f64> {
        let until = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < until {
            last = self.query(promql).first().map(|r| r.1);
            if last == Some(want) {
                break;
            }
            thread::sleep(Duration::from_millis(250));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server scrapes a system-wide exporter (`-o none --listen`) every second:
/// PromQL over what it stored gives the workload's own call counts per cmd, flags and result,
/// and its GLOBAL median within 25% (the classic buckets are at most 21% apart).
#[test]
fn prometheus_scrapes_exact_counts_errors_and_the_global_median() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut w = Workload::start(&[
        "--eperm",
        "7",
        "--invalid",
        "5",
        "--bad-flags",
        "3",
        "--query",
        "11",
        "--expedited",
        "400",
        "--threads",
        "2",
        "--global",
        "30",
    ]);
    let tracer = Tracer::start(&["-o", "none", "--listen", &listen]);
    let prom = Prometheus::start(&listen);
    w.go();
    let mine = w.finish();
    let pid = mine["pid"].as_u64().unwrap();
    let truth = workload_counts(&mine);
    let total: u64 = truth.values().sum();
    let sel = format!("{{job=\"membarrier\",pid=\"{pid}\"}}");
    let got = prom.wait_for(&format!("sum(membarrier_calls_total{sel})"), total as f64);
    assert_eq!(got, Some(total as f64), "{}", prom.log());

    let names = [
        (0, "QUERY"),
        (1, "GLOBAL"),
        (3, "INVALID(3)"),
        (8, "PRIVATE_EXPEDITED"),
        (16, "REGISTER_PRIVATE_EXPEDITED"),
    ];
    let want: BTreeMap<(String, String, String), f64> = truth
        .iter()
        .map(|((cmd, flags, errno), &n)| {
            let name = names.iter().find(|c| c.0 == *cmd).unwrap().1;
            let result = if errno.is_empty() { "ok" } else { errno };
            (
                (name.to_string(), flags.to_string(), result.to_string()),
                n as f64,
            )
        })
        .collect();
    let scraped: BTreeMap<(String, String, String), f64> = prom
        .query(&format!(
            "sum by (cmd, flags, result) (membarrier_calls_total{sel})"
        ))
        .into_iter()
        .map(|(m, v)| {
            let l = |k: &str| m[k].as_str().unwrap().to_string();
            ((l("cmd"), l("flags"), l("result")), v)
        })
        .collect();
    assert_eq!(scraped, want);
    assert!(want.keys().any(|k| k.2 == "EINVAL") && want.keys().any(|k| k.2 == "EPERM"));

    // The histogram's count is the calls; the median of the stored buckets is the workload's.
    let global_sel = format!("{{job=\"membarrier\",pid=\"{pid}\",cmd=\"GLOBAL\"}}");
    let count = prom.query(&format!(
        "membarrier_call_duration_seconds_count{global_sel}"
    ));
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].1, 30.0);
    let p50 = prom.query(&format!(
        "histogram_quantile(0.5, sum by (le) (membarrier_call_duration_seconds_bucket{global_sel}))"
    ))[0]
        .1;
    let own = mine["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["cmd"] == 1)
        .unwrap()["p50_ns"]
        .as_f64()
        .unwrap()
        / 1e9;
    assert!(
        p50 > own * 0.75 && p50 < own * 1.25,
        "PromQL p50 {p50} s vs the workload's {own} s"
    );

    // Scraped as OpenMetrics (Prometheus asks for it first), with the tracer's own series.
    let up = prom.query("up{job=\"membarrier\"}");
    assert_eq!(up[0].1, 1.0, "{}", prom.log());
    let info = prom.query("membarrier_trace_info{job=\"membarrier\"}");
    assert_eq!(info.len(), 1);
    assert!(info[0].0["attach"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(!prom.query("membarrier_trace_dropped_total").is_empty());
    assert_eq!(
        prom.query(&format!("membarrier_cpu_seconds_total{sel}"))
            .len(),
        2
    );

    // The 0.0.4 text format passes promtool's lint.
    let (code, text) = http_get(&listen, "/metrics", "text/plain").unwrap();
    assert_eq!(code, 200);
    assert_lint_clean(&text);
    assert_eq!(http_get(&listen, "/nothing", "*/*").unwrap().0, 404);

    // Every query of the shipped Grafana dashboard runs (`query` asserts success), and all but
    // the IPI panel's (this workload may send none) and the RCU writers' (it has none; their
    // rules are checked by promtool) find series. Rows hold no query.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("prometheus/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let promql = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            // rate() needs two scrapes of a series: the first may have been the last just now.
            let until = Instant::now() + Duration::from_secs(10);
            let mut result = prom.query(&promql);
            while result.is_empty() && Instant::now() < until {
                thread::sleep(Duration::from_millis(250));
                result = prom.query(&promql);
            }
            assert!(
                !result.is_empty()
                    || expr.contains("membarrier_ipis_total")
                    || expr.contains("membarrier_rcu_"),
                "{}: {expr} finds nothing",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 8);

    // SIGTERM stops a plain exporter cleanly, with nothing on stdout.
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

/// A plain exporter tracing `--pid`s goes on serving once they have exited, until SIGTERM:
/// else the calls made since the last scrape never reach Prometheus (a real one, scraping
/// every second, saw nothing of a 20,000-call workload that ran between two scrapes).
#[test]
fn the_exporter_serves_the_final_counts_after_the_pids_exit() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let prom = Prometheus::start(&listen);
    let mut w = Workload::start(&["--query", "20000"]);
    let pid = w.pid.to_string();
    let mut tracer = Tracer::start(&["-o", "none", "--listen", &listen, "-p", &pid]);
    w.go();
    let mine = w.finish();
    let total: u64 = workload_counts(&mine).values().sum();
    assert_eq!(total, 20_000);
    // Still there: the traced process is gone, the metrics are not.
    let sel = format!("{{job=\"membarrier\",pid=\"{pid}\"}}");
    let got = prom.wait_for(&format!("sum(membarrier_calls_total{sel})"), total as f64);
    assert_eq!(got, Some(total as f64), "{}", prom.log());
    assert!(tracer.child().try_wait().unwrap().is_none());
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "every traced process has exited; still serving the final metrics until SIGTERM"
        ),
        "{stderr}"
    );
}

/// The repository's docs/.
fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// The shipped recording and alerting rules load, and their unit tests (each alert raised by a
/// case that should raise it, quiet on a healthy one near its threshold) pass in promtool.
#[test]
fn prometheus_rules_pass_promtool() {
    let dir = docs().join("prometheus");
    for args in [
        &["check", "rules", "rules.yml"][..],
        &["test", "rules", "rules_test.yml"],
    ] {
        let out = run(Command::new("promtool").args(args).current_dir(&dir));
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `--listen :PORT` serves every address, as node_exporter's `--web.listen-address` does: the
/// IPv4 and the IPv6 loopback both answer, with the same exact count. `--version` names the
/// commit it was built from.
#[test]
fn a_bare_port_listens_on_every_address_and_version_names_the_commit() {
    let _machine = require_root();
    let port = free_port();
    let tracer = Tracer::start(&[
        "-o",
        "none",
        "--listen",
        &format!(":{port}"),
        "--by",
        "comm",
    ]);
    let w = run(Command::new(WORKLOAD).args(["--name", "mt-anyaddr", "--query", "300"]));
    assert!(w.status.success());
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let start = Instant::now();
        loop {
            let metrics = http_get(&addr, "/metrics", "text/plain").map(|(_, m)| m);
            let n = metrics
                .as_deref()
                .and_then(|m| scraped_calls(m, "comm=\"mt-anyaddr\""));
            if n == Some(300) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{addr}: {n:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
    tracer.signal(libc::SIGTERM);
    let _ = tracer.finish();
    let v = run(Command::new(TRACER).arg("--version"));
    let said = String::from_utf8_lossy(&v.stdout);
    let commit = said
        .trim()
        .strip_prefix(concat!(
            "membarrier-trace ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .and_then(|c| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{said}"));
    // Built from a git checkout: its HEAD.
    assert!(
        commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{said}"
    );
}

/// Exited processes leave the per-pid series after --keep-exited; per name they stay, summed.
#[test]
fn exited_processes_leave_the_metrics_after_keep_exited_and_stay_by_comm() {
    let _machine = require_root();
    let (by_pid, by_comm) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let a = Tracer::start(&["-o", "none", "--listen", &by_pid, "--keep-exited", "1"]);
    let b = Tracer::start(&["-o", "none", "--listen", &by_comm, "--by", "comm"]);
    let scrape = |addr: &str| http_get(addr, "/metrics", "text/plain").unwrap().1;
    let mut pids = Vec::new();
    for _ in 0..2 {
        let mut w = Workload::start(&["--query", "5", "--name", "mt-keep-exited"]);
        w.go();
        pids.push(w.finish()["pid"].as_u64().unwrap());
    }
    // Just exited: still shown (the first scrape that sees it exited starts its clock).
    let pid_label = |pid: u64| format!("pid=\"{pid}\",comm=\"mt-keep-exited\"");
    for &pid in &pids {
        assert_eq!(scraped_calls(&scrape(&by_pid), &pid_label(pid)), Some(5));
    }
    thread::sleep(Duration::from_millis(1500));
    let later = scrape(&by_pid);
    for &pid in &pids {
        assert_eq!(scraped_calls(&later, &pid_label(pid)), None, "{pid}");
    }
    // By name: no pid label, both processes summed, and they stay.
    let comm = "{comm=\"mt-keep-exited\",cmd=\"QUERY\",flags=\"0\",result=\"ok\"}";
    assert!(scrape(&by_comm).contains(&format!("membarrier_calls_total{comm} 10\n")));
    for t in [a, b] {
        t.signal(libc::SIGTERM);
        assert!(t.finish().status.success());
    }
}

/// A finding while it holds is a series a real Prometheus reads: `membarrier_finding` 1 with
/// its rule, severity and cmd, and its main figure (here the EPERM calls the workload made
/// unregistered) in `membarrier_finding_figure`; a healthy process beside it has none.
#[test]
fn findings_are_metrics_while_they_hold() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let prom = Prometheus::start(&listen);
    let mut bad = Workload::start(&["--eperm", "7", "--name", "finding-bad"]);
    let mut good = Workload::start(&["--expedited", "50", "--name", "finding-good"]);
    let (pid, good_pid) = (bad.pid.to_string(), good.pid.to_string());
    let tracer = Tracer::start(&[
        "-o", "none", "--listen", &listen, "-p", &pid, "-p", &good_pid,
    ]);
    bad.go();
    good.go();
    let mine = bad.finish();
    good.finish();
    let eperm = workload_counts(&mine)
        .iter()
        .filter(|((_, _, errno), _)| errno == "EPERM")
        .map(|(_, n)| n)
        .sum::<u64>();
    assert_eq!(eperm, 7, "{mine}");
    let sel = format!(
        "{{job=\"membarrier\",rule=\"unregistered_eperm\",pid=\"{pid}\",comm=\"finding-bad\",cmd=\"PRIVATE_EXPEDITED\""
    );
    let held = prom.wait_for(
        &format!("membarrier_finding{sel},severity=\"critical\"}}"),
        1.0,
    );
    assert_eq!(held, Some(1.0), "{}", prom.log());
    let figure = prom.wait_for(
        &format!("membarrier_finding_figure{sel},figure=\"eperm\"}}"),
        eperm as f64,
    );
    assert_eq!(figure, Some(eperm as f64), "{}", prom.log());
    let healthy = prom.query(&format!(
        "membarrier_finding{{job=\"membarrier\",pid=\"{good_pid}\"}}"
    ));
    assert!(healthy.is_empty(), "{healthy:?}");
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
}

/// With native histograms on (Prometheus 2.42's `--enable-feature=native-histograms`), the
/// scrape is protobuf and each duration histogram is one series: a real server reads every
/// call, a p50 within the buckets' error of the classic histogram's (the same exporter's text
/// scrape, whose buckets are exact), and at most 10 series per (pid, cmd) where the classic
/// form has 116 for the histogram alone.
#[test]
fn native_histograms_are_one_series_and_exact() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let prom = Prometheus::start_with(&listen, &["--enable-feature=native-histograms"]);
    let mut w = Workload::start(&["--expedited", "20000"]);
    let pid = w.pid.to_string();
    let tracer = Tracer::start(&["-o", "none", "--listen", &listen, "-p", &pid]);
    w.go();
    let mine = w.finish();
    assert_eq!(workload_counts(&mine)[&(8, 0, String::new())], 20_000);
    let sel = format!("{{job=\"membarrier\",pid=\"{pid}\",cmd=\"PRIVATE_EXPEDITED\"}}");
    let count = prom.wait_for(
        &format!("histogram_count(membarrier_call_duration_seconds{sel})"),
        20_000.0,
    );
    assert_eq!(count, Some(20_000.0), "{}", prom.log());
    // The classic buckets of the text scrape: the p50 lies in the first one holding half.
    let (_, text) = http_get(&listen, "/metrics", "text/plain").unwrap();
    let prefix = format!(
        "membarrier_call_duration_seconds_bucket{{pid=\"{pid}\",comm=\"membarrier-work\",cmd=\"PRIVATE_EXPEDITED\",le=\""
    );
    let mut lo = 0.0;
    let mut hi = f64::INFINITY;
    for line in text.lines().filter_map(|l| l.strip_prefix(&prefix)) {
        let (le, n) = line.split_once("\"} ").unwrap();
        let (le, n): (f64, u64) = (le.parse().unwrap_or(f64::INFINITY), n.parse().unwrap());
        if n < 10_000 {
            lo = le;
        } else {
            hi = le;
            break;
        }
    }
    assert!(lo > 0.0 && hi.is_finite(), "{lo} {hi}");
    let p50 = prom.query(&format!(
        "histogram_quantile(0.5, membarrier_call_duration_seconds{sel})"
    ));
    let p50 = p50.first().map(|r| r.1).unwrap();
    // Schema 3's buckets are 9% wide; a kernel bucket (6%) goes whole into one.
    assert!(
        p50 > lo / 1.16 && p50 < hi * 1.16,
        "native p50 {p50} s, classic between {lo} and {hi}"
    );
    let series = prom.query(&format!("count({{job=\"membarrier\",pid=\"{pid}\"}})"));
    let cmds = prom.query(&format!(
        "count(count by (cmd) (membarrier_calls_total{{job=\"membarrier\",pid=\"{pid}\"}}))"
    ));
    let (series, cmds) = (series[0].1, cmds[0].1);
    eprintln!("native p50 {p50} s (classic {lo}..{hi}); {series} series for {cmds} cmds");
    assert!(
        cmds >= 2.0 && series <= 10.0 * cmds,
        "{series} series for {cmds} cmds"
    );
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
}
