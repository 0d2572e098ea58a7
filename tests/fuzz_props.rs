//! Property tests at volume over every parser a tenant's or a server's input reaches (issue 13):
//! the policy loader, the formula compiler with its cost budget, the trace loader, the label
//! selector parser and the Prometheus answer parsers. None may panic, and an accepted formula
//! must evaluate within its run-time budget.
//!
//! Case counts are moderate by default; `KSCALE_FUZZ_CASES=100000 cargo test --release --test
//! fuzz_props` runs them at volume. The coverage-guided counterparts are in `fuzz/`
//! (`cargo +nightly fuzz run <target>`).

use std::path::Path;
use std::time::{Duration, Instant};

use kscale::policy::formula::{Formula, MAX_FORMULA_COST};
use proptest::prelude::*;

/// Cases per property: `KSCALE_FUZZ_CASES`, default 256.
fn cases() -> u32 {
    std::env::var("KSCALE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The run-time budget an accepted formula must meet (`--formula-timeout`'s default).
const BUDGET: Duration = Duration::from_secs(1);

/// Formulas from a grammar of the constructs the README promises, nested freely: arithmetic,
/// comparisons, conditionals, `max`/`min`, the math extension, conversions, lists, maps and
/// every comprehension macro.
fn formula() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("rps".to_string()),
        Just("cpu".to_string()),
        Just("values.rps".to_string()),
        Just("values['cpu']".to_string()),
        Just("values".to_string()),
        Just("current".to_string()),
        Just("ready".to_string()),
        Just("x".to_string()),
        Just("'ab'".to_string()),
        (0i64..20).prop_map(|i| i.to_string()),
        (0.0f64..100.0).prop_map(|f| format!("{f:.1}")),
        (1usize..12).prop_map(|n| format!(
            "[{}]",
            (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        )),
    ];
    leaf.prop_recursive(8, 64, 3, |inner| {
        let two = (inner.clone(), inner.clone());
        prop_oneof![
            two.clone().prop_map(|(a, b)| format!("({a} + {b})")),
            two.clone().prop_map(|(a, b)| format!("({a} * {b})")),
            two.clone().prop_map(|(a, b)| format!("({a} - {b})")),
            two.clone().prop_map(|(a, b)| format!("({a} / {b})")),
            two.clone()
                .prop_map(|(a, b)| format!("({a} > {b} ? {a} : {b})")),
            two.clone().prop_map(|(a, b)| format!("max({a}, {b})")),
            two.clone().prop_map(|(a, b)| format!("min({a}, {b})")),
            two.clone()
                .prop_map(|(a, b)| format!("math.greatest({a}, {b})")),
            two.clone().prop_map(|(a, b)| format!("[{a}, {b}]")),
            two.clone()
                .prop_map(|(a, b)| format!("{{'k': {a}, 'l': {b}}}")),
            two.clone().prop_map(|(a, b)| format!("({a} in {b})")),
            two.clone()
                .prop_map(|(a, b)| format!("({a} == {b} && {a} != {b} || {a} < {b})")),
            two.clone().prop_map(|(a, b)| format!("{a}.map(x, {b})")),
            two.clone().prop_map(|(a, b)| format!("{a}.all(x, {b})")),
            two.clone().prop_map(|(a, b)| format!("{a}.exists(x, {b})")),
            two.clone()
                .prop_map(|(a, b)| format!("{a}.exists_one(x, {b})")),
            two.clone().prop_map(|(a, b)| format!("{a}.filter(x, {b})")),
            two.clone()
                .prop_map(|(a, b)| format!("{a}.map(x, x > 0, {b})")),
            inner.clone().prop_map(|a| format!("size({a})")),
            inner.clone().prop_map(|a| format!("int({a})")),
            inner.clone().prop_map(|a| format!("double({a})")),
            inner.clone().prop_map(|a| format!("string({a})")),
            inner.clone().prop_map(|a| format!("math.ceil({a})")),
            inner.clone().prop_map(|a| format!("math.abs({a})")),
            inner.clone().prop_map(|a| format!("{a}[0]")),
            inner.clone().prop_map(|a| format!("-{a}")),
            inner.prop_map(|a| format!("!{a}")),
        ]
    })
}

/// Compiles `source`; when accepted, evaluates it on a few inputs and checks each evaluation
/// meets the run-time budget. Returns whether it was accepted.
fn compile_and_run(source: &str) -> bool {
    let started = Instant::now();
    let compiled = Formula::compile(source, &["rps", "cpu"]);
    assert!(
        started.elapsed() < BUDGET,
        "compiling {source:?} took {:?}",
        started.elapsed()
    );
    let Ok(f) = compiled else { return false };
    for (p, v) in [
        ([0, 0], [0.0, 0.0]),
        ([7, 1_000_000], [1e9, -3.5]),
        ([i32::MAX, i32::MIN], [f64::NAN, f64::INFINITY]),
    ] {
        let started = Instant::now();
        let _ = f.evaluate(&p, &v, 3, 2);
        assert!(
            started.elapsed() < BUDGET,
            "evaluating {source:?} took {:?}",
            started.elapsed()
        );
    }
    true
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn generated_formulas_compile_within_budget_and_run_within_it(source in formula()) {
        compile_and_run(&source);
    }

    #[test]
    fn arbitrary_text_as_a_formula_never_panics(source in "[a-z0-9_.,()\\[\\]{}'\" +*/%<>=!?:&|-]{0,200}") {
        compile_and_run(&source);
    }

    #[test]
    fn arbitrary_bytes_as_a_formula_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        compile_and_run(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn the_policy_loader_never_panics_on_mutated_examples(
        example in prop_oneof![
            Just("examples/backend-rich.yaml"),
            Just("examples/backend-rps.yaml"),
            Just("examples/backend-hpa-cpu.yaml"),
        ],
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..4, "[ -~\n]{0,8}"), 0..6),
    ) {
        let mut text = std::fs::read_to_string(example).expect("example");
        for (at, delete, insert) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let mut end = (i + delete).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            text.replace_range(i..end, &insert);
        }
        let _ = kscale::load::parse_policies(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn the_policy_loader_never_panics_on_arbitrary_text(text in "[ -~\n\t]{0,400}") {
        let _ = kscale::load::parse_policies(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn the_trace_loader_never_panics(text in "([0-9T:.,+\\-Za-z \"\n]{0,40}){0,20}") {
        let _ = kscale::source::trace::Trace::from_reader(Path::new("fuzz.csv"), text.as_bytes());
    }

    #[test]
    fn the_trace_loader_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = kscale::source::trace::Trace::from_reader(Path::new("fuzz.csv"), bytes.as_slice());
    }

    #[test]
    fn the_label_selector_parser_never_panics(text in "[a-z0-9./_ ,!=()-]{0,80}|(in|notin|[a-z]+|[=!,() ]){0,20}") {
        let _ = kscale::source::pods::parse_selector(&text);
    }

    #[test]
    fn the_prometheus_parsers_never_panic_on_text(status in prop_oneof![Just(200u16), Just(400), Just(422), Just(503), any::<u16>()], body in "[ -~]{0,300}") {
        let _ = kscale::source::prometheus::parse_response(status, &body);
        let _ = kscale::source::prometheus::parse_range_response(status, &body);
    }

    #[test]
    fn the_prometheus_parsers_never_panic_on_answers(
        result_type in prop_oneof![Just("vector"), Just("matrix"), Just("scalar"), Just("string"), Just("other")],
        values in proptest::collection::vec(
            (prop_oneof![Just("1.5".to_string()), Just("NaN".to_string()), Just("+Inf".to_string()), Just("x".to_string()), "-?[0-9]{1,30}(\\.[0-9]{0,5})?(e[+-]?[0-9]{1,4})?"],
             prop_oneof![Just("1700000000".to_string()), Just("1e300".to_string()), Just("-1e300".to_string()), Just("NaN".to_string()), "-?[0-9]{1,20}(\\.[0-9]{1,12})?"]),
            0..6),
        warnings in any::<bool>(),
    ) {
        let pairs: Vec<String> = values.iter().map(|(v, t)| format!("[{t}, \"{v}\"]")).collect();
        let series = format!("{{\"metric\": {{}}, \"value\": {}, \"values\": [{}]}}",
            pairs.first().cloned().unwrap_or_else(|| "[]".into()), pairs.join(","));
        let result = match result_type {
            "scalar" | "string" => pairs.first().cloned().unwrap_or_else(|| "[]".into()),
            _ => format!("[{series}, {series}]"),
        };
        let body = format!(
            "{{\"status\": \"success\", \"data\": {{\"resultType\": \"{result_type}\", \"result\": {result}}}{}}}",
            if warnings { ", \"warnings\": [\"partial\"]" } else { "" }
        );
        let _ = kscale::source::prometheus::parse_response(200, &body);
        let _ = kscale::source::prometheus::parse_range_response(200, &body);
    }
}

/// The examples of issue 13: seven and twelve nested comprehensions are refused at compile time,
/// at once, naming the limit.
#[test]
fn the_nested_comprehension_examples_are_refused_at_once() {
    for depth in [7, 12] {
        let mut s = "rps > 0".to_string();
        for _ in 0..depth {
            s = format!("[1,2,3,4,5,6,7,8,9,10].all(rps, {s})");
        }
        let started = Instant::now();
        let e = Formula::compile(&s, &["rps"]).expect_err("over the limit");
        assert!(started.elapsed() < BUDGET);
        assert!(e.contains(&format!("limit of {MAX_FORMULA_COST}")), "{e}");
    }
}
