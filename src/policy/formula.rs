//! The optional CEL formula that combines the metrics' proposals into one replica count.
//!
//! Variables: each metric's name is bound to its proposal (an int); `values` maps each metric's
//! name to its value (a double); `current` and `ready` are the current and ready replica counts.
//! Functions: CEL's standard library, its math extension (`math.greatest`, `math.ceil`, ...), and
//! `max(...)` / `min(...)`. The result must be a number; it is rounded up to a whole replica count.
//!
//! A metric without a usable number (missing, stale, invalid or failing) is absent: its name is
//! unbound and `values` has no key for it, so `has(values.queue) ? queue : rps` routes around
//! it, and a formula that reads it anyway fails (and the fallback applies).

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::objects::{Key, Value};
use cel::{Context, Env, Program};

pub use super::formula_cost::MAX_FORMULA_COST;

/// A compiled formula.
#[derive(Clone)]
pub struct Formula {
    source: String,
    names: Vec<String>,
    program: Arc<Program>,
    env: Arc<Env>,
    /// Set on a formula its caller refused to run again (see [`Formula::refused`]).
    refused: Option<Arc<str>>,
    /// The metrics whose presence the formula tests (`has(values.x)`, `'x' in values`).
    guarded: Vec<String>,
}

impl std::fmt::Debug for Formula {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Formula").field(&self.source).finish()
    }
}

/// Variable names a formula may use besides the metric names.
pub const BUILTIN_VARIABLES: [&str; 3] = ["values", "current", "ready"];

impl Formula {
    /// Parses `source`, bounds its worst-case cost (refused over [`MAX_FORMULA_COST`], see
    /// [`super::formula_cost`]), checks that every variable it names is a metric or a built-in,
    /// and that it evaluates to a number on sample inputs (which catches unknown functions).
    pub fn compile(source: &str, metric_names: &[&str]) -> Result<Formula, String> {
        let mut env = Env::stdlib();
        env.add_extension(cel::extensions::math)
            .map_err(|e| format!("could not set up CEL: {e}"))?;
        let env = Arc::new(env);
        let program = env
            .compile(source)
            .map_err(|e| format!("does not parse as CEL: {}", one_line(&e.to_string())))?;
        // Bounded before anything runs it: the sample evaluation below included.
        let estimate =
            super::formula_cost::estimate_with_names(program.expression(), metric_names)?;
        if estimate.bound.cost > MAX_FORMULA_COST {
            return Err(format!(
                "has an estimated worst-case cost of {} units, over the limit of {MAX_FORMULA_COST} \
                 (each comprehension costs its range's size times its body; nested ones multiply)",
                estimate.bound.cost
            ));
        }
        // Names no metric, built-in, comprehension variable or type binds (a comprehension's
        // variable, `values.exists(m, ...)`, is not a metric).
        let unknown = estimate.unknown;
        if !unknown.is_empty() {
            // A near miss of a metric or built-in name is suggested (`rsp` → `rps`).
            let near: Vec<String> = unknown
                .iter()
                .filter_map(|u| {
                    let known = metric_names.iter().chain(&BUILTIN_VARIABLES).copied();
                    super::compile::suggest(u, known).map(|s| match unknown.len() {
                        1 => format!("{s:?}"),
                        _ => format!("{s:?} for {u:?}"),
                    })
                })
                .collect();
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", near.join(", "))
            };
            return Err(format!(
                "names unknown {} {}; known metrics: {}; built-ins: {}{hint}",
                if unknown.len() == 1 {
                    "metric"
                } else {
                    "metrics"
                },
                unknown
                    .iter()
                    .map(|u| format!("{u:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                metric_names.join(", "),
                BUILTIN_VARIABLES.join(", ")
            ));
        }
        let mut guarded = Vec::new();
        presence_tests(program.expression(), &mut guarded);
        guarded.retain(|g| metric_names.contains(&g.as_str()));
        let formula = Formula {
            source: source.to_string(),
            names: metric_names.iter().map(|n| (*n).to_string()).collect(),
            program: Arc::new(program),
            env,
            refused: None,
            guarded,
        };
        let sample: Vec<Option<(i32, f64)>> = metric_names.iter().map(|_| Some((1, 1.0))).collect();
        match formula.execute(&sample, 1, 1)? {
            // A non-finite result at these inputs (`1.0 / (values.rps - 1.0)`) is the same.
            Ok(result) => {
                number_of(result)?;
            }
            // An error only these sample inputs cause (a division by `rps - 1`, an index past
            // a filtered list) does not make the formula invalid: at run time the fallback
            // applies when it happens.
            Err(e) if depends_on_inputs(&e) => {}
            Err(e) => {
                return Err(format!("failed to evaluate: {}", one_line(&e.to_string())));
            }
        }
        Ok(formula)
    }

    /// The formula's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// This formula, refused: its evaluation fails at once with `reason` instead of running,
    /// so the policy's fallback applies and its reason says why. The controller uses it for a
    /// formula that overran its run-time budget, until the policy's generation changes.
    pub fn refused(&self, reason: &str) -> Formula {
        Formula {
            refused: Some(Arc::from(reason)),
            ..self.clone()
        }
    }

    /// Whether the formula tests metric `name`'s presence (`has(values.name)` or
    /// `'name' in values`): its author routed around that metric's failure explicitly.
    pub fn tests_presence_of(&self, name: &str) -> bool {
        self.guarded.iter().any(|g| g == name)
    }

    /// Evaluates the formula with one proposal and one value per metric, in spec order; the result is rounded up and kept within `i32`.
    pub fn evaluate(
        &self,
        proposals: &[i32],
        values: &[f64],
        current: i32,
        ready: i32,
    ) -> Result<i32, String> {
        let present: Vec<Option<(i32, f64)>> = proposals
            .iter()
            .zip(values)
            .map(|(p, v)| Some((*p, *v)))
            .collect();
        self.evaluate_present(&present, current, ready)
    }

    /// Evaluates the formula with one entry per metric, in spec order: `Some((proposal,
    /// value))`, or `None` for a metric without a usable number, which the formula sees as
    /// absent (its name unbound, no key in `values`).
    pub fn evaluate_present(
        &self,
        present: &[Option<(i32, f64)>],
        current: i32,
        ready: i32,
    ) -> Result<i32, String> {
        if let Some(reason) = &self.refused {
            return Err(reason.to_string());
        }
        let result = self
            .execute(present, current, ready)?
            .map_err(|e| format!("failed to evaluate: {}", one_line(&e.to_string())))?;
        to_replicas(result)
    }

    /// Runs the program on one set of inputs; the outer error is a set-up failure, the inner
    /// one CEL's own.
    fn execute(
        &self,
        present: &[Option<(i32, f64)>],
        current: i32,
        ready: i32,
    ) -> Result<Result<Value, cel::ExecutionError>, String> {
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        // `max(a, b, ...)` and `min(...)` read naturally in a policy; cel-go spells them
        // `math.greatest` / `math.least`, which work too.
        ctx.add_function("max", cel::functions::max)
            .map_err(|e| format!("could not set up CEL: {e}"))?;
        ctx.add_function("min", cel::functions::min)
            .map_err(|e| format!("could not set up CEL: {e}"))?;
        let mut map: HashMap<Key, Value> = HashMap::with_capacity(self.names.len());
        for (name, entry) in self.names.iter().zip(present) {
            if let Some((proposal, value)) = entry {
                ctx.add_variable_from_value(name.as_str(), Value::Int(i64::from(*proposal)));
                map.insert(Key::from(name.as_str()), Value::Float(*value));
            }
        }
        ctx.add_variable_from_value("values", Value::Map(map.into()));
        ctx.add_variable_from_value("current", Value::Int(i64::from(current)));
        ctx.add_variable_from_value("ready", Value::Int(i64::from(ready)));
        Ok(self.program.execute(&ctx))
    }
}

/// Collects the names `e` tests for presence in `values`: `has(values.x)` and `'x' in values`.
fn presence_tests(e: &IdedExpr, out: &mut Vec<String>) {
    let is_values = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if n == "values");
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => {}
        Expr::Select(s) => {
            if s.test && is_values(&s.operand) {
                out.push(s.field.clone());
            }
            presence_tests(&s.operand, out);
        }
        Expr::List(l) => l.elements.iter().for_each(|x| presence_tests(x, out)),
        Expr::Map(m) => m.entries.iter().for_each(|x| entry_tests(&x.expr, out)),
        Expr::Struct(s) => s.entries.iter().for_each(|x| entry_tests(&x.expr, out)),
        Expr::Call(c) => {
            if c.func_name == operators::IN
                && let [key, map] = c.args.as_slice()
                && let Expr::Literal(LiteralValue::String(k)) = &key.expr
                && is_values(map)
            {
                out.push(k.inner().to_string());
            }
            if let Some(t) = c.target.as_deref() {
                presence_tests(t, out);
            }
            c.args.iter().for_each(|x| presence_tests(x, out));
        }
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                presence_tests(x, out);
            }
        }
    }
}

fn entry_tests(e: &EntryExpr, out: &mut Vec<String>) {
    match e {
        EntryExpr::MapEntry(m) => {
            presence_tests(&m.key, out);
            presence_tests(&m.value, out);
        }
        EntryExpr::StructField(f) => presence_tests(&f.value, out),
    }
}

/// Whether a CEL error comes from the values a formula ran on rather than from the formula
/// itself (an unknown function, a wrong type): the variables' types never change, their
/// values do.
fn depends_on_inputs(e: &cel::ExecutionError) -> bool {
    use cel::ExecutionError as E;
    matches!(
        e,
        E::DivisionByZero(_)
            | E::RemainderByZero(_)
            | E::Overflow(..)
            | E::IndexOutOfBounds(_)
            | E::FunctionError { .. }
    )
}

/// A formula's result as a replica count: a finite number, rounded up and kept within `i32`.
fn to_replicas(result: Value) -> Result<i32, String> {
    let number = number_of(result)?;
    if !number.is_finite() {
        return Err(format!("evaluated to {number}, not a finite number"));
    }
    Ok(number.ceil().clamp(0.0, f64::from(i32::MAX)) as i32)
}

/// A formula's result as a number, or why it is not one.
fn number_of(result: Value) -> Result<f64, String> {
    Ok(match result {
        Value::Int(i) => i as f64,
        Value::UInt(u) => u as f64,
        Value::Float(f) => f,
        other => {
            return Err(format!(
                "must evaluate to a number, got {}",
                type_name(&other)
            ));
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::String(_) => "a string",
        Value::Bool(_) => "a bool",
        Value::Null => "null",
        _ => "a non-number",
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_of_proposals() {
        let f = Formula::compile("max(rps, cpu)", &["rps", "cpu"]).unwrap();
        assert_eq!(f.evaluate(&[3, 7], &[1.0, 2.0], 1, 1).unwrap(), 7);
    }

    #[test]
    fn uses_values_and_current() {
        let f = Formula::compile("values.rps / 100.0 + double(current)", &["rps"]).unwrap();
        assert_eq!(f.evaluate(&[0], &[250.0], 2, 2).unwrap(), 5);
    }

    #[test]
    fn rejects_unknown_metric() {
        let e = Formula::compile("max(rsp, cpu)", &["rps", "cpu"]).unwrap_err();
        assert!(e.contains("\"rsp\""), "{e}");
    }

    #[test]
    fn rejects_parse_error() {
        let e = Formula::compile("max(rps,", &["rps"]).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
    }

    #[test]
    fn rejects_non_number() {
        let e = Formula::compile("'x'", &["rps"]).unwrap_err();
        assert!(e.contains("number"), "{e}");
    }

    /// Everything the README promises a formula can use still compiles under the cost limit:
    /// the variables, `max`/`min`, the math extension and the standard library's operators,
    /// conversions and macros over the metrics' values.
    #[test]
    fn every_promised_function_compiles_under_the_limit() {
        let names = ["rps", "cpu"];
        for source in [
            "max(rps, cpu)",
            "min(rps, cpu)",
            "max([rps, cpu, current])",
            "math.greatest(rps, cpu, ready)",
            "math.least(rps, cpu)",
            "math.ceil(values.rps / 10.0)",
            "math.floor(values.cpu)",
            "math.round(values.cpu)",
            "math.trunc(values.cpu)",
            "math.abs(rps - cpu)",
            "math.sign(values.rps)",
            "math.sqrt(values.rps)",
            "math.isNaN(values.rps) || math.isInf(values.rps) || !math.isFinite(values.rps) ? 1 : 2",
            "math.bitAnd(rps, 3) + math.bitOr(rps, 1) + math.bitXor(rps, cpu) + math.bitNot(rps)",
            "math.bitShiftLeft(rps, 1) + math.bitShiftRight(cpu, 1)",
            "rps + cpu * 2 - current / 2 + ready % 3",
            "rps > cpu ? rps : cpu",
            "int(values.rps) + int(double(cpu)) + int(uint(rps))",
            "size(values) + size('abc') + size([1, 2])",
            "'rps' in values ? rps : cpu",
            "has(values.rps) ? rps : 0",
            "values['rps'] * 2.0",
            "string(rps).size() > 0 ? rps : 0",
            "'abc'.contains('b') && 'abc'.startsWith('a') && 'abc'.endsWith('c') ? 1 : 0",
            "values.exists(rps, values[rps] > 100.0) ? max(rps, cpu) : min(rps, cpu)",
            "values.all(rps, values[rps] >= 0.0) ? 1 : 0",
            "values.exists_one(rps, rps == 'cpu') ? 1 : 0",
            "[rps, cpu].map(rps, rps * 2).filter(cpu, cpu > 1).size()",
            "[rps, cpu].map(rps, rps > 0, rps + 1)[0]",
            "{'a': rps}['a']",
            "type(rps) == int ? 1 : 0",
            // A comprehension's own variable is not a metric.
            "values.exists(m, values[m] > 100.0) ? [1, 2].map(x, x * rps)[1] : cpu",
        ] {
            Formula::compile(source, &names).unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }

    #[test]
    fn a_failed_metric_is_absent_and_presence_tests_are_found() {
        let f = Formula::compile(
            "has(values.queue) ? max(rps, queue) : rps",
            &["rps", "queue"],
        )
        .unwrap();
        assert!(f.tests_presence_of("queue") && !f.tests_presence_of("rps"));
        assert_eq!(f.evaluate_present(&[Some((3, 300.0)), None], 1, 1), Ok(3));
        assert_eq!(
            f.evaluate_present(&[Some((3, 300.0)), Some((8, 80.0))], 1, 1),
            Ok(8)
        );
        // Read without a test, an absent metric is an error naming it.
        let e = f
            .evaluate_present(&[None, Some((8, 80.0))], 1, 1)
            .unwrap_err();
        assert!(e.contains("rps"), "{e}");
        let f = Formula::compile(
            "'rps' in values ? rps : [1].map(x, has(values.cpu) ? 1 : x)[0]",
            &["rps", "cpu"],
        )
        .unwrap();
        assert!(f.tests_presence_of("rps") && f.tests_presence_of("cpu"));
        // Only tests of `values` count.
        let f = Formula::compile("has({'rps': 1}.rps) ? rps : 1", &["rps"]).unwrap();
        assert!(!f.tests_presence_of("rps"));
    }

    #[test]
    fn an_unknown_name_near_a_known_one_gets_a_did_you_mean() {
        let e = Formula::compile("max(rsp, cpu)", &["rps", "cpu"]).unwrap_err();
        assert!(
            e.ends_with("names unknown metric \"rsp\"; known metrics: rps, cpu; built-ins: values, current, ready; did you mean \"rps\"?"),
            "{e}"
        );
        let e = Formula::compile("max(rsp, curent, latency)", &["rps", "cpu"]).unwrap_err();
        assert!(
            e.ends_with("did you mean \"current\" for \"curent\", \"rps\" for \"rsp\"?"),
            "{e}"
        );
        // Nothing near: no suggestion.
        let e = Formula::compile("max(rps, latency)", &["rps", "cpu"]).unwrap_err();
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn a_comprehension_variable_is_unknown_outside_its_comprehension() {
        let e = Formula::compile("[1].all(m, m > 0) && m > 0 ? 1 : 0", &["rps"]).unwrap_err();
        assert!(e.contains("names unknown metric \"m\""), "{e}");
    }

    #[test]
    fn the_nested_examples_are_refused_naming_the_estimate_and_the_limit() {
        for depth in [7, 12] {
            let mut s = "rps > 0".to_string();
            for _ in 0..depth {
                s = format!("[1,2,3,4,5,6,7,8,9,10].all(rps, {s})");
            }
            let e = Formula::compile(&format!("{s} ? rps : 1"), &["rps"]).unwrap_err();
            assert!(e.contains("estimated worst-case cost of"), "{e}");
            assert!(e.contains("over the limit of 100000"), "{e}");
        }
    }
}
