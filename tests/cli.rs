//! The `kscale` binary end to end: validate, backtest, crd.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/readme_backtest.rs"]
mod readme_backtest;
use readme_backtest::elb_comparison;

fn kscale(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kscale runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const ELB: &str = "examples/traces/elb_request_count_8c0756.csv";

#[test]
fn examples_validate() {
    let o = kscale(&[
        "validate",
        "-p",
        "examples/backend-hpa-cpu.yaml",
        "examples/backend-rps.yaml",
        "examples/backend-rich.yaml",
        "examples/backend-forecast.yaml",
        "examples/worker-queue-zero.yaml",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches(": valid").count(), 5, "{}", text(&o));
}

#[test]
fn forecast_backtest_compares_with_a_warm_up_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("forecast.svg");
    let o = kscale(&[
        "backtest",
        "-p",
        "examples/backend-forecast.yaml",
        "-t",
        ELB,
        "--scale",
        "1.5",
        "--capacity",
        "100",
        "--startup",
        "60s",
        "--warmup",
        "2d",
        "--compare",
        "examples/backend-rps.yaml",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for row in ["accuracy U/O %", "timeshare U/O %", "ratio to oracle"] {
        assert!(out.contains(row), "{row} missing: {out}");
    }
    assert!(
        out.contains("(4032 rows, 2014-04-12 00:04"),
        "evaluations start after the warm-up: {out}"
    );
    assert!(plot.exists());

    let o = kscale(&[
        "backtest",
        "-p",
        "examples/backend-forecast.yaml",
        "--prometheus",
        "http://127.0.0.1:9",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--from"), "{}", text(&o));
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "bad.yaml",
        r#"apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: ok}
spec:
  targetRef: {kind: Deployment, name: web}
  maxReplicas: 3
  metrics:
  - name: rps
    prometheus: {query: 'sum(x)'}
    target: {type: Value, value: "10"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: broken}
spec:
  targetRef: {kind: Deployment, name: web}
  minReplicas: 5
  maxReplicas: 2
  formula: "max(rps, latency"
  metrics:
  - name: rps
    prometheus: {query: 'sum(x)'}
    target: {type: Sometimes, value: "10"}
  schedules:
  - {cron: "0 25 * * *", duration: 1h, minReplicas: 1}
"#,
    );
    let o = kscale(&["validate", "--policy", f.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("ok: valid"), "{out}");
    assert!(
        out.contains("spec.maxReplicas: 2 is below spec.minReplicas (5)"),
        "{out}"
    );
    assert!(
        out.contains("spec.metrics[0].target.type: unknown value \"Sometimes\""),
        "{out}"
    );
    assert!(
        out.contains("spec.formula: \"max(rps, latency\" does not parse as CEL"),
        "{out}"
    );
    assert!(
        out.contains(
            "spec.schedules[0].cron: \"0 25 * * *\": the hour (0-23) field \"25\" is not valid"
        ),
        "{out}"
    );
    assert!(out.contains("kscale: 1 invalid policy"), "{out}");
}

#[test]
fn validate_names_unknown_formula_metric() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read_to_string("examples/backend-rich.yaml")
        .unwrap()
        .replace("max(rps, p99, cpu)", "max(rps, latency)");
    let f = write(dir.path(), "p.yaml", &body);
    let out = text(&kscale(&["validate", "-p", f.to_str().unwrap()]));
    assert!(
        out.contains("spec.formula: \"max(rps, latency)\" names unknown metric \"latency\""),
        "{out}"
    );
}

#[test]
fn validate_checks_the_policy_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read_to_string("examples/backend-rps.yaml")
        .unwrap()
        .replace(
            "\n  metrics:",
            "\n  prometheus:\n    url: 'https://bob:hunter2@thanos:9090'\n    timeout: 0s\n    headers: [{name: 'X Tenant', value: a}]\n  metrics:",
        );
    let f = write(dir.path(), "p.yaml", &body);
    let out = text(&kscale(&["validate", "-p", f.to_str().unwrap()]));
    for needle in [
        "spec.prometheus.url: must not carry credentials",
        "spec.prometheus.timeout: must be longer than zero",
        "spec.prometheus.headers[0].name: \"X Tenant\" is not an HTTP header name",
    ] {
        assert!(out.contains(needle), "{needle} not in {out}");
    }
}

/// Issue 16: the walkthrough's mistakes (a misspelled field, a type error, broken PromQL) and
/// more, all in one run, each with its path and line; a misspelling is an unknown field with a
/// suggestion, never a missing field.
#[test]
fn validate_reports_every_mistake_in_one_run_with_lines_and_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "three.yaml",
        r#"apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: backend}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: backend}
  minReplicas: three
  maxReplica: 10
  mode: Dryrun
  interval: 1ms
  metrics:
  - name: rps
    prometheus:
      query: 'sum(rate(http_requests_total[1m])'
    target: {type: AverageValue, averageValue: "70"}
  - name: queue
    prometheus: {query: 'sum(queue_depth) $ 2'}
    target: {type: AverageValue, averageValue: "5"}
    activationTreshold: "1"
"#,
    );
    let o = kscale(&["validate", "-p", f.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    for needle in [
        "backend (document 1): 7 problems",
        "  line 6: spec.minReplicas: must be an integer, got the string \"three\"",
        "  line 7: spec.maxReplica: unknown field; did you mean maxReplicas?",
        "  line 8: spec.mode: unknown value \"Dryrun\"; expected one of Controller, ExternalMetric, DryRun; did you mean DryRun?",
        "  line 18: spec.metrics[1].activationTreshold: unknown field; did you mean activationThreshold?",
        "  line 9: spec.interval: must be at least 1s",
        "  line 13: spec.metrics[0].prometheus.query: is not valid PromQL: unclosed left parenthesis (at character 4)",
        "  line 16: spec.metrics[1].prometheus.query: is not valid PromQL: unexpected character: '$' (at character 18)",
    ] {
        assert!(out.contains(needle), "{needle:?} not in\n{out}");
    }
    assert!(!out.contains("missing field"), "{out}");

    // Fixed, the same file is valid: the checks above were about the mistakes alone.
    let fixed = std::fs::read_to_string(&f)
        .unwrap()
        .replace("minReplicas: three", "minReplicas: 3")
        .replace("maxReplica:", "maxReplicas:")
        .replace("Dryrun", "DryRun")
        .replace("1ms", "15s")
        .replace("[1m])'", "[1m]))'")
        .replace(" $ 2", " / 2")
        .replace("activationTreshold: \"1\"", "");
    let f = write(dir.path(), "fixed.yaml", &fixed);
    let o = kscale(&["validate", "-p", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn validate_takes_files_without_the_flag_and_skips_other_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = write(
        dir.path(),
        "deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    );
    // `kscale validate FILE...`, a new user's first try, with a glob that also matches the
    // Deployment beside the policy.
    let o = kscale(&[
        "validate",
        "examples/backend-rps.yaml",
        deployment.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("deployment.yaml: no ScalingPolicy, skipped"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("examples/backend-rps.yaml: backend: valid"),
        "{}",
        text(&o)
    );
    // Files of other kinds only: nothing was checked, which is not a pass.
    let o = kscale(&["validate", deployment.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("the file given holds no ScalingPolicy"),
        "{}",
        text(&o)
    );
}

#[test]
fn import_reads_hpa_files_and_writes_policies_that_validate() {
    let dir = tempfile::tempdir().unwrap();
    let hpas = write(
        dir.path(),
        "hpas.yaml",
        r#"apiVersion: v1
kind: List
items:
- apiVersion: autoscaling/v1
  kind: HorizontalPodAutoscaler
  metadata: {name: backend, namespace: shop}
  spec:
    scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: backend}
    maxReplicas: 10
    targetCPUUtilizationPercentage: 50
- apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  metadata: {name: worker, namespace: shop}
  spec:
    scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: worker}
    maxReplicas: 10
    metrics:
    - type: Pods
      pods: {metric: {name: "jobs/sec"}, target: {type: AverageValue, averageValue: "5"}}
- apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  metadata: {name: queue, namespace: shop}
  spec:
    scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: queue}
    maxReplicas: 10
    metrics:
    - type: Pods
      pods: {metric: {name: jobs}, target: {type: AverageValue, averageValue: "5"}}
    - type: External
      external: {metric: {name: queue_depth, selector: {matchLabels: {queue: orders}}}, target: {type: Value, value: "30"}}
"#,
    );
    let o = kscale(&["import", "-f", hpas.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("not imported: shop/worker: spec.metrics[0].pods.metric.name: \"jobs/sec\": kscale reads metric names of letters, digits and _ . : | - only"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 3 HorizontalPodAutoscalers not imported"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout.contains("name: backend"), "{stdout}");
    assert!(stdout.contains("averageUtilization: 50"), "{stdout}");
    assert!(stdout.contains("mode: DryRun"), "{stdout}");
    assert!(stdout.contains("name: queue_depth"), "{stdout}");
    assert!(stdout.contains("queue: orders"), "{stdout}");
    assert!(
        stdout.contains(
            "kscale.dev/imported-from: autoscaling/v1 HorizontalPodAutoscaler shop/backend"
        ),
        "{stdout}"
    );
    // What import writes, validate accepts.
    let policy = write(dir.path(), "policy.yaml", &stdout);
    let o = kscale(&["validate", policy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn validate_missing_file() {
    let o = kscale(&["validate", "-p", "/nonexistent/policy.yaml"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("/nonexistent/policy.yaml: cannot read"),
        "{}",
        text(&o)
    );
}

#[test]
fn backtest_json_on_a_real_trace() {
    let o = kscale(&[
        "backtest",
        "-p",
        "examples/backend-rps.yaml",
        "-t",
        ELB,
        "--scale",
        "1.5",
        "--capacity",
        "100",
        "--startup",
        "60s",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let summary = &v["summary"];
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(
        summary["evaluations"].as_u64().unwrap() as usize,
        steps.len()
    );
    // 14 days at 15 s: 80 000-odd evaluations.
    assert!(steps.len() > 80_000, "{}", steps.len());
    let first = &steps[0];
    assert_eq!(first["time"], "2014-04-10T00:04:00Z");
    assert!(first["replicas"].as_i64().unwrap() >= 3);
    assert!(first["metrics"]["rps"].is_number());
    assert!(
        first["reason"].as_str().unwrap().contains("rps="),
        "{}",
        first["reason"]
    );
    for s in steps {
        let r = s["replicas"].as_i64().unwrap();
        assert!((3..=10).contains(&r));
        assert!(s["ready_replicas"].as_i64().unwrap() <= r);
    }
    let rh = summary["replica_hours"].as_f64().unwrap();
    let oracle = summary["oracle_replica_hours"].as_f64().unwrap();
    assert!(rh > oracle && oracle > 0.0, "{rh} vs {oracle}");
    // The oracle is held to minReplicas 3: at least 3 replicas at every evaluation, and never
    // below the unbounded one (which may run 0).
    let floor = 3.0 * steps.len() as f64 * 15.0 / 3600.0;
    assert!(oracle >= floor - 1e-6, "{oracle} under the floor's {floor}");
    let unbounded = summary["oracle_unbounded_replica_hours"].as_f64().unwrap();
    assert!(
        unbounded > 0.0 && unbounded < oracle,
        "{unbounded} vs {oracle}"
    );
    assert!(v.get("verdict").is_none(), "no verdict without --compare");
    // Every minute short of capacity is in one of the listed stretches, in order and disjoint
    // (adjacent ones would have been one), each really short at its peak.
    let minutes = summary["slo_violation_minutes"].as_f64().unwrap();
    assert!(minutes > 0.0, "{minutes}");
    let time =
        |v: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let mut total = 0.0;
    let mut previous_end = None;
    for v in summary["slo_violations"].as_array().unwrap() {
        let (start, end) = (time(&v["start"]), time(&v["end"]));
        assert!(previous_end.is_none_or(|e| start > e), "{v}");
        assert!(end > start, "{v}");
        let ready = v["ready_replicas"].as_f64().unwrap();
        assert!(v["peak_demand"].as_f64().unwrap() > 100.0 * ready, "{v}");
        total += (end - start).num_seconds() as f64 / 60.0;
        previous_end = Some(end);
    }
    assert!((total - minutes).abs() < 1e-6, "{total} vs {minutes}");
}

/// The README's first comparison: the table and the JSON end with the same verdict line, with the
/// figures the summaries give (replica-hours 1094.1 vs 1233.7, SLO minutes 82.2 vs 50.0,
/// scaling actions 639 vs 1017).
#[test]
fn backtest_summary_ends_with_the_verdict() {
    let args = |format: &'static str| elb_comparison(&["--format", format]);
    let expected = "shop/backend: \u{2212}11 % replica-hours, +64 % SLO-violation minutes, \
                    \u{2212}37 % scaling actions vs shop/backend-hpa-cpu";
    let o = kscale(&args("table"));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(out.trim_end().lines().last(), Some(expected), "{out}");
    // Both oracles per policy: held to minReplicas 3..maxReplicas 10, and unbounded.
    let row = |label: &str| {
        out.lines()
            .find(|l| l.starts_with(label))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no row {label}: {out}"))
    };
    assert_eq!(row("oracle replica-hours")[2..], ["1023.7", "1023.7"]);
    assert_eq!(row("unbounded oracle r-h")[3..], ["528.5", "528.5"]);
    assert_eq!(row("ratio to oracle")[3..], ["1.069", "1.205"]);

    let o = kscale(&args("json"));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], expected);
}

#[test]
fn backtest_is_deterministic() {
    let args = [
        "backtest",
        "-p",
        "examples/backend-hpa-cpu.yaml",
        "-t",
        ELB,
        "--capacity",
        "100",
        "--scale",
        "1.5",
        "--format",
        "json",
    ];
    let a = kscale(&args);
    let b = kscale(&args);
    assert!(a.status.success(), "{}", text(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn backtest_writes_svg_and_png_plots() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["svg", "png"] {
        let plot = dir.path().join(format!("plot.{ext}"));
        let o = kscale(&elb_comparison(&["--plot", plot.to_str().unwrap()]));
        assert!(o.status.success(), "{}", text(&o));
        // The table says when each policy was short of capacity.
        let out = text(&o);
        assert!(
            out.contains("SLO violations of shop/backend: ")
                && out.contains("ready replicas (capacity 300)"),
            "{out}"
        );
        let bytes = std::fs::read(&plot).unwrap();
        if ext == "svg" {
            let s = String::from_utf8(bytes).unwrap();
            assert!(
                s.trim_start().starts_with("<svg") || s.starts_with("<?xml"),
                "not an SVG"
            );
            assert!(s.trim_end().ends_with("</svg>"));
            assert!(s.contains("shop/backend-hpa-cpu"));
        } else {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
        let out = text(&o);
        assert!(
            out.contains("shop/backend")
                && out.contains("shop/backend-hpa-cpu")
                && out.contains("replica-hours"),
            "{out}"
        );
    }
}

#[test]
fn backtest_bad_traces_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "garbage.csv",
            "timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:05:00,lots\n",
            "line 3",
        ),
        ("empty.csv", "", "empty"),
        ("header.csv", "timestamp,value\n", "no rows"),
        (
            "backwards.csv",
            "timestamp,value\n2024-01-01 00:05:00,1\n2024-01-01 00:00:00,2\n",
            "line 3",
        ),
        ("badtime.csv", "timestamp,value\nyesterday,1\n", "yesterday"),
    ];
    for (name, body, needle) in cases {
        let f = write(dir.path(), name, body);
        let o = kscale(&[
            "backtest",
            "-p",
            "examples/backend-rps.yaml",
            "-t",
            f.to_str().unwrap(),
        ]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {out}");
        assert!(out.contains(name) && out.contains(needle), "{name}: {out}");
        assert!(!out.contains("panicked"), "{name}: {out}");
    }
}

#[test]
fn backtest_bad_flags_are_named() {
    let o = kscale(&[
        "backtest",
        "-p",
        "examples/backend-rps.yaml",
        "-t",
        ELB,
        "--metric",
        "latency=value",
    ]);
    assert!(
        text(&o)
            .contains("--metric latency=value: the policy shop/backend has no metric \"latency\""),
        "{}",
        text(&o)
    );
    let o = kscale(&["backtest", "-p", "examples/backend-hpa-cpu.yaml", "-t", ELB]);
    assert!(text(&o).contains("give --capacity"), "{}", text(&o));
    let o = kscale(&[
        "backtest",
        "-p",
        "examples/backend-rps.yaml",
        "-t",
        ELB,
        "--startup",
        "soon",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("--startup"),
        "{}",
        text(&o)
    );
}

#[test]
fn crd_prints_schema_with_cel_rules() {
    let o = kscale(&["crd"]);
    assert!(o.status.success());
    let crd: serde_yaml::Value = serde_yaml::from_slice(&o.stdout).unwrap();
    assert_eq!(crd["metadata"]["name"], "scalingpolicies.kscale.dev");
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("x-kubernetes-validations"));
    assert!(s.contains("self.minReplicas <= self.maxReplicas"));
    // The committed copy is current.
    let committed = std::fs::read_to_string("deploy/crd/scalingpolicies.kscale.dev.yaml")
        .expect("deploy/crd/scalingpolicies.kscale.dev.yaml is committed");
    assert_eq!(
        committed, s,
        "deploy/crd is stale: run `cargo run -- crd > deploy/crd/scalingpolicies.kscale.dev.yaml`"
    );
}

#[test]
fn run_refuses_a_renew_deadline_not_shorter_than_the_lease() {
    // Checked before anything connects: no cluster is needed for the refusal.
    let o = kscale(&[
        "run",
        "--leader-lease-duration",
        "4s",
        "--leader-renew-deadline",
        "4s",
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("--leader-renew-deadline") && t.contains("--leader-lease-duration"),
        "{t}"
    );
    let o = kscale(&[
        "run",
        "--leader-lease-duration",
        "10s",
        "--leader-renew",
        "8s",
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("--leader-renew ") && t.contains("--leader-renew-deadline"),
        "{t}"
    );
}

#[test]
fn run_refuses_shards_out_of_bounds_or_without_election() {
    // Checked before anything connects: no cluster is needed for the refusal.
    for bad in ["0", "257", "-1", "many"] {
        let o = kscale(&["run", &format!("--shards={bad}")]);
        assert!(!o.status.success(), "--shards {bad}");
        let t = text(&o);
        assert!(t.contains("--shards"), "--shards {bad}: {t}");
    }
    let o = kscale(&["run", "--shards", "3", "--leader-elect=false"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("--shards 3") && t.contains("--leader-elect"),
        "{t}"
    );
}

#[test]
fn a_bad_prometheus_url_names_where_it_came_from() {
    // Checked before anything connects: no cluster is needed for the refusal.
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kscale"));
        c.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("KUBECONFIG", "/nonexistent")
            .env_remove("KSCALE_PROMETHEUS_URL");
        if let Some(url) = env {
            c.env("KSCALE_PROMETHEUS_URL", url);
        }
        let o = c.output().expect("kscale runs");
        assert!(!o.status.success(), "{args:?}");
        text(&o)
    };
    let t = run(&["run", "--prometheus-url", "ftp://prom:9090"], None);
    assert!(
        t.contains("--prometheus-url ftp://prom:9090: scheme \"ftp\" is not http or https"),
        "{t}"
    );
    let t = run(&["run"], Some("ftp://prom:9090"));
    assert!(
        t.contains("KSCALE_PROMETHEUS_URL ftp://prom:9090: scheme \"ftp\""),
        "{t}"
    );
    let t = run(
        &["dry-run", "-p", "examples/backend-recommended.yaml"],
        Some("prom:9090"),
    );
    assert!(
        t.contains("KSCALE_PROMETHEUS_URL prom:9090: has no scheme"),
        "{t}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "kscale.yaml", "prometheus-url: prom:9090\n");
    let t = run(&["run", "--config", file.to_str().unwrap()], None);
    assert!(
        t.contains(&format!(
            "prometheus-url (config file {}) prom:9090: has no scheme",
            file.display()
        )),
        "{t}"
    );
}

/// `depth` comprehensions over ten elements nested inside each other (issue 13, kind 1).
fn nested_formula(depth: usize) -> String {
    let mut s = "rps > 0".to_string();
    for _ in 0..depth {
        s = format!("[1,2,3,4,5,6,7,8,9,10].all(rps, {s})");
    }
    format!("{s} ? rps : 1")
}

#[test]
fn validate_and_backtest_refuse_a_formula_over_the_cost_limit_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for depth in [7, 12] {
        let body = std::fs::read_to_string("examples/backend-rps.yaml")
            .unwrap()
            .replace(
                "  behavior:",
                &format!("  formula: '{}'\n  behavior:", nested_formula(depth)),
            );
        let f = write(dir.path(), &format!("nested-{depth}.yaml"), &body);
        // Both return at once: the estimate is made before anything evaluates the formula.
        let out = text(&kscale(&["validate", "-p", f.to_str().unwrap()]));
        assert!(out.contains("spec.formula:"), "{out}");
        assert!(
            out.contains("estimated worst-case cost") && out.contains("over the limit of 100000"),
            "{out}"
        );
        let o = kscale(&["backtest", "-p", f.to_str().unwrap(), "-t", ELB]);
        assert!(!o.status.success());
        assert!(
            text(&o).contains("over the limit of 100000"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn validate_refuses_an_interval_below_one_second() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read_to_string("examples/backend-rps.yaml")
        .unwrap()
        .replace("interval: 15s", "interval: 1ms");
    let f = write(dir.path(), "p.yaml", &body);
    let out = text(&kscale(&["validate", "-p", f.to_str().unwrap()]));
    assert!(
        out.contains("spec.interval: must be at least 1s") && out.contains("\"1ms\""),
        "{out}"
    );
}

/// Issue 15, item 3: a formula routing around a failed metric, replayed from a trace with gaps
/// (a gap older than `fallback.staleAfter` is a stale metric). Worked out by hand, interval 60s,
/// 4 replicas at first; `rps` targets 100/replica and `queue` 10/replica, each proposing
/// ceil(value / target) outside the 10% tolerance:
/// - 00:00 rps 400, queue 40: 4 and 4, hold 4;
/// - 00:01 queue stale: the formula takes `rps` (4), hold 4, failure 1;
/// - 00:02 queue stale, rps 200: the formula says 2 and tests has(values.queue), so it may
///   scale down: 4→2 (no stabilization), failure 2;
/// - 00:03 both back, queue 50 on 2 replicas: 5, scale up 2→5, failures reset;
/// - 00:04 rps stale: the formula reads `rps` without has() and fails: failure 1 of 2, hold;
/// - 00:05 still stale: failure 2 of 2, fallback Hold keeps 5;
/// - 00:06 both back at 5 replicas' worth: hold 5.
#[test]
fn backtest_formula_routes_around_a_failed_metric() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        dir.path(),
        "failover.yaml",
        r#"apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: failover, namespace: t}
spec:
  targetRef: {kind: Deployment, name: w}
  minReplicas: 1
  maxReplicas: 10
  interval: 1m
  metrics:
  - {name: rps, prometheus: {query: rps}, target: {type: AverageValue, averageValue: "100"}}
  - {name: queue, prometheus: {query: queue}, target: {type: AverageValue, averageValue: "10"}}
  formula: 'has(values.queue) ? max(rps, queue) : rps'
  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}
  fallback: {staleAfter: 30s, failureThreshold: 2}
"#,
    );
    let trace = write(
        dir.path(),
        "failover.csv",
        "timestamp,rps,queue\n\
         2026-01-01 00:00:00,400,40\n\
         2026-01-01 00:01:00,400,\n\
         2026-01-01 00:02:00,200,\n\
         2026-01-01 00:03:00,200,50\n\
         2026-01-01 00:04:00,,50\n\
         2026-01-01 00:05:00,,50\n\
         2026-01-01 00:06:00,500,50\n",
    );
    let o = kscale(&[
        "backtest",
        "-p",
        policy.to_str().unwrap(),
        "-t",
        trace.to_str().unwrap(),
        "--metric",
        "rps=rps",
        "--metric",
        "queue=queue",
        "--initial-replicas",
        "4",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = v["steps"].as_array().unwrap();
    let replicas: Vec<i64> = steps
        .iter()
        .map(|s| s["replicas"].as_i64().unwrap())
        .collect();
    assert_eq!(replicas, [4, 4, 2, 5, 5, 5, 5], "{v:#}");
    let reason = |i: usize| steps[i]["reason"].as_str().unwrap().to_string();
    for (i, needles) in [
        (0, &["hold 4→4", "formula"][..]),
        (
            1,
            &[
                "hold 4→4",
                "queue stale",
                "the formula ran without queue (absent)",
            ],
        ),
        (
            2,
            &["scale down 4→2", "the formula ran without queue (absent)"],
        ),
        (3, &["scale up 2→5", "queue=50"]),
        (
            4,
            &[
                "hold 5→5",
                "rps stale",
                "formula reads metric rps, which has no value at this evaluation (rps failed)",
                "failure 1 of 2: the fallback applies at 2, holding until then",
            ],
        ),
        (5, &["hold 5→5", "fallback Hold keeps the current count"]),
        (6, &["hold 5→5", "rps=500"]),
    ] {
        for needle in needles {
            assert!(
                reason(i).contains(needle),
                "step {i}: {needle:?} not in {}",
                reason(i)
            );
        }
    }
    assert_eq!(v["summary"]["degraded_evaluations"], 4);
}
