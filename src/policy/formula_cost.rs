//! A static, worst-case cost estimate of a CEL formula, computed when the formula is compiled.
//!
//! The idea is the one the Kubernetes apiserver applies to CEL validation rules: walk the parsed
//! expression once and bound, for every node, how much work evaluating it can take and how large
//! the value it yields can be. A comprehension (`all`, `exists`, `exists_one`, `map`, `filter`)
//! costs as many iterations as its range can hold elements, times its body; nested ones multiply.
//! A formula whose bound exceeds [`MAX_FORMULA_COST`] is refused before it is ever run, so
//! `kscale validate`, the backtest and the controller all refuse it alike.
//!
//! The bound is sound for the expressions the formula's environment can build:
//! - every value has a *size*: 1 for a number, bool, null, timestamp or duration; the length in
//!   bytes of a string or bytes; for a list or map, the sum of its entries' sizes (each at least
//!   1). A list's or map's length, and the size of any element, is at most its size;
//! - inputs are known: each metric is an int, `current` and `ready` are ints, `values` is a map
//!   of one double per metric;
//! - a literal is its own size; `+` on lists or strings adds sizes; an index, a field or
//!   `max`/`min` is at most its operand; a conversion to string or bytes adds at most
//!   [`STRING_SLACK`]; any other call yields a number or bool (size 1), or, for a function not
//!   known here, at most the sum of its arguments plus [`STRING_SLACK`];
//! - a call costs 1 plus the sizes of its arguments (comparing, copying, concatenating or
//!   searching them is at most linear), on top of evaluating them;
//! - a comprehension's accumulator must grow by at most a bounded amount per iteration (the
//!   macros append at most one element, or keep a bool or a count); anything else is refused.
//!
//! One cost unit is about one interpreter step (a node visited or an element touched). Measured
//! with `cargo test --lib policy::formula_cost::timing -- --ignored --nocapture` (a debug build,
//! on a shared 2-core machine): comprehension-heavy formulas take 0.4 to 1 µs per unit, list
//! building a few ns; so a formula at the limit runs in at most about 100 ms unoptimized, and
//! well below that in a release build, far inside the controller's `--formula-timeout` (1 s).
//!
//! The estimate is deliberately coarse: ten nested levels of a ten-element list, which really
//! do 10^10 iterations, estimate at about 1.6 × 10^11 units; three levels (1000 iterations)
//! pass at about 16000, four (10^4 iterations) are refused at about 164000.

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators};

/// The largest estimated cost a formula may have, in cost units (about one interpreter step
/// each). Kubernetes allows a CEL validation rule one million; a formula runs once per policy
/// and interval on a daemon shared by every tenant, so it gets a tenth of that.
pub const MAX_FORMULA_COST: u64 = 100_000;

/// What a conversion to a string or bytes may add to its argument's size (the longest printed
/// number, timestamp or duration is shorter).
pub const STRING_SLACK: u64 = 64;

/// The bound of one expression: the work to evaluate it and the shape of its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Upper bound of the work, in cost units.
    pub cost: u64,
    /// Upper bound of the value's length: elements of a list or map, bytes of a string; 1 for
    /// a scalar.
    pub len: u64,
    /// Upper bound of the size of any one element (key or value) of a list or map; 1 otherwise.
    pub elem: u64,
}

impl Bound {
    /// Upper bound of the value's whole size: its length times its largest element.
    pub fn size(&self) -> u64 {
        mul(self.len.max(1), self.elem.max(1))
    }

    fn scalar(cost: u64) -> Bound {
        Bound {
            cost,
            len: 1,
            elem: 1,
        }
    }

    /// A value of unknown shape `size` large: any element may be as large as all of it.
    fn opaque(cost: u64, size: u64) -> Bound {
        Bound {
            cost,
            len: size.max(1),
            elem: size.max(1),
        }
    }
}

/// A variable's shape: (length, element size).
type Shape = (u64, u64);

/// The estimator's scope: the variables visible at a node and their shapes, innermost last, and
/// the names read that none of them binds.
struct Scope<'a> {
    vars: Vec<(&'a str, Shape)>,
    unknown: std::collections::BTreeSet<&'a str>,
}

/// Type names a formula may compare with `type(x)`.
const TYPE_NAMES: [&str; 10] = [
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

impl<'a> Scope<'a> {
    fn lookup(&self, name: &str) -> Option<Shape> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }
}

/// A formula's estimate and the names it reads that are neither a metric, a built-in variable,
/// a comprehension's variable nor a type name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// The bound of the whole formula.
    pub bound: Bound,
    /// Unknown names, sorted.
    pub unknown: Vec<String>,
}

/// Estimates the worst-case cost of `expr`, where each of `metric_names` is an int, `current`
/// and `ready` are ints and `values` maps each metric name to a double. An error says which
/// part could not be bounded.
pub fn estimate(expr: &IdedExpr, metric_names: &[&str]) -> Result<Bound, String> {
    estimate_with_names(expr, metric_names).map(|e| e.bound)
}

/// [`estimate`], with the unknown names the formula reads.
pub fn estimate_with_names(expr: &IdedExpr, metric_names: &[&str]) -> Result<Estimate, String> {
    let longest_name = metric_names
        .iter()
        .map(|n| n.len() as u64)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut scope = Scope {
        vars: Vec::with_capacity(metric_names.len() + 3),
        unknown: std::collections::BTreeSet::new(),
    };
    for name in metric_names {
        scope.vars.push((name, (1, 1)));
    }
    scope.vars.push(("current", (1, 1)));
    scope.vars.push(("ready", (1, 1)));
    scope
        .vars
        .push(("values", ((metric_names.len() as u64).max(1), longest_name)));
    let bound = bound(expr, &mut scope)?;
    Ok(Estimate {
        bound,
        unknown: scope.unknown.into_iter().map(str::to_string).collect(),
    })
}

fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

fn literal_len(l: &LiteralValue) -> u64 {
    match l {
        LiteralValue::String(s) => s.inner().len() as u64,
        LiteralValue::Bytes(b) => b.inner().len() as u64,
        _ => 1,
    }
}

/// Functions whose result is a number, bool or other scalar whatever their arguments.
fn scalar_result(name: &str) -> bool {
    matches!(
        name,
        operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO
            | operators::NEGATE
            | operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS
            | operators::LOGICAL_AND
            | operators::LOGICAL_OR
            | operators::LOGICAL_NOT
            | operators::NOT_STRICTLY_FALSE
            | operators::IN
            | "size"
            | "int"
            | "uint"
            | "double"
            | "bool"
            | "type"
            | "timestamp"
            | "duration"
            | "contains"
            | "startsWith"
            | "endsWith"
            | "matches"
            | "hasValue"
    ) || name.starts_with("get")
        || (name.starts_with("math.") && name != "math.@max" && name != "math.@min")
}

fn bound<'a>(e: &'a IdedExpr, scope: &mut Scope<'a>) -> Result<Bound, String> {
    match &e.expr {
        Expr::Unspecified => Ok(Bound::scalar(1)),
        Expr::Literal(l) => Ok(Bound {
            cost: 1,
            len: literal_len(l).max(1),
            elem: 1,
        }),
        // An unknown name (a type name such as `int`, a namespace) is a scalar.
        Expr::Ident(name) => {
            let (len, elem) = scope.lookup(name).unwrap_or_else(|| {
                if !TYPE_NAMES.contains(&name.as_str()) {
                    scope.unknown.insert(name);
                }
                (1, 1)
            });
            Ok(Bound { cost: 1, len, elem })
        }
        Expr::Select(s) => {
            let operand = bound(&s.operand, scope)?;
            let cost = add(operand.cost, add(1, s.field.len() as u64));
            if s.test {
                Ok(Bound::scalar(cost))
            } else {
                // A map's value (an element), or an unknown message's field (all of it).
                Ok(Bound::opaque(cost, operand.elem))
            }
        }
        Expr::List(list) => {
            let mut cost = 1u64;
            let mut elem = 1u64;
            for element in &list.elements {
                let b = bound(element, scope)?;
                cost = add(cost, add(b.cost, 1));
                elem = elem.max(b.size());
            }
            Ok(Bound {
                cost,
                len: (list.elements.len() as u64).max(1),
                elem,
            })
        }
        Expr::Map(map) => entries(&map.entries, scope),
        Expr::Struct(s) => entries(&s.entries, scope),
        Expr::Call(call) => {
            let mut cost = 1u64;
            let mut args = Vec::with_capacity(call.args.len() + 1);
            // `math.ceil(x)`: a function of a namespace (a name no variable binds), not a
            // method of a variable.
            let namespace = match call.target.as_deref() {
                Some(IdedExpr {
                    expr: Expr::Ident(ns),
                    ..
                }) if scope.lookup(ns).is_none() => Some(ns.as_str()),
                _ => None,
            };
            let qualified;
            let receiver = match namespace {
                Some(ns) => {
                    qualified = format!("{ns}.{}", call.func_name);
                    None
                }
                None => {
                    qualified = String::new();
                    call.target.as_deref()
                }
            };
            for arg in receiver.into_iter().chain(call.args.iter()) {
                let b = bound(arg, scope)?;
                // Evaluating the argument, then touching all of it at most once (comparing,
                // copying, concatenating or searching it).
                cost = add(cost, add(b.cost, b.size()));
                args.push(b);
            }
            let name = if namespace.is_some() {
                qualified.as_str()
            } else {
                call.func_name.as_str()
            };
            let max_of = |f: fn(&Bound) -> u64, from: usize| {
                args.iter().skip(from).map(f).max().unwrap_or(1)
            };
            let sum_of = |f: fn(&Bound) -> u64| args.iter().map(f).fold(0, add);
            if scalar_result(name) {
                return Ok(Bound::scalar(cost));
            }
            Ok(match name {
                // Lists and strings concatenate; numbers add (a scalar, bounded the same way).
                operators::ADD => Bound {
                    cost,
                    len: sum_of(|b| b.len).max(1),
                    elem: max_of(|b| b.elem, 0),
                },
                // One of the branches.
                operators::CONDITIONAL => Bound {
                    cost,
                    len: max_of(|b| b.len, 1),
                    elem: max_of(|b| b.elem, 1),
                },
                // An element of the operand.
                operators::INDEX | operators::OPT_INDEX | operators::OPT_SELECT => {
                    Bound::opaque(cost, args.first().map_or(1, |b| b.elem))
                }
                // One of the arguments, or an element of a list argument.
                "max" | "min" | "math.@max" | "math.@min" | "dyn" => {
                    Bound::opaque(cost, max_of(Bound::size, 0))
                }
                // A string or bytes: at most its argument printed, or a printed scalar.
                "string" | "bytes" => Bound {
                    cost,
                    len: add(sum_of(Bound::size), STRING_SLACK),
                    elem: 1,
                },
                // Functions not known here: at most their arguments and a printed scalar, in
                // any shape.
                _ => Bound::opaque(cost, add(sum_of(Bound::size), STRING_SLACK)),
            })
        }
        Expr::Comprehension(c) => comprehension(c, scope),
    }
}

fn entries<'a>(
    entries: &'a [cel::common::ast::IdedEntryExpr],
    scope: &mut Scope<'a>,
) -> Result<Bound, String> {
    let mut cost = 1u64;
    let mut elem = 1u64;
    for entry in entries {
        let (key_size, value) = match &entry.expr {
            EntryExpr::MapEntry(m) => {
                let k = bound(&m.key, scope)?;
                cost = add(cost, k.cost);
                (k.size(), bound(&m.value, scope)?)
            }
            EntryExpr::StructField(f) => (f.field.len() as u64, bound(&f.value, scope)?),
        };
        cost = add(cost, add(value.cost, 1));
        elem = elem.max(key_size).max(value.size());
    }
    Ok(Bound {
        cost,
        len: (entries.len() as u64).max(1),
        elem,
    })
}

fn comprehension<'a>(c: &'a ComprehensionExpr, scope: &mut Scope<'a>) -> Result<Bound, String> {
    let range = bound(&c.iter_range, scope)?;
    let init = bound(&c.accu_init, scope)?;
    // A list or map holds at most `len` elements (keys), each at most `elem` large.
    let iterations = range.len;
    let depth = scope.vars.len();
    scope
        .vars
        .push((c.iter_var.as_str(), (range.elem, range.elem)));
    if let Some(v2) = &c.iter_var2 {
        scope.vars.push((v2.as_str(), (range.elem, range.elem)));
    }
    // How the accumulator grows: each step yields `k` times the accumulator plus `plus`.
    let final_accu = match grow(&c.loop_step, &c.accu_var, scope) {
        Ok(g) if g.k == 0 => Some((init.len.max(g.len), init.elem.max(g.elem))),
        Ok(g) if g.k == 1 => Some((add(init.len, mul(iterations, g.len)), init.elem.max(g.elem))),
        Ok(_) | Err(()) => None,
    };
    let Some(final_accu) = final_accu else {
        scope.vars.truncate(depth);
        return Err(
            "has a comprehension whose accumulated value cannot be bounded (only all, exists, \
             exists_one, map and filter are supported)"
                .to_string(),
        );
    };
    scope.vars.push((c.accu_var.as_str(), final_accu));
    let step = bound(&c.loop_step, scope);
    let cond = bound(&c.loop_cond, scope);
    // The result sees the accumulator, not the iteration variables.
    scope.vars.truncate(depth);
    scope.vars.push((c.accu_var.as_str(), final_accu));
    let result = bound(&c.result, scope);
    scope.vars.truncate(depth);
    let (step, cond, result) = (step?, cond?, result?);
    let per_iteration = add(add(step.cost, cond.cost), 1);
    Ok(Bound {
        cost: add(
            add(add(range.cost, init.cost), mul(iterations, per_iteration)),
            result.cost,
        ),
        len: result.len,
        elem: result.elem,
    })
}

/// Whether `e` reads the variable `name` (not shadowed by a nested comprehension).
fn reads(e: &IdedExpr, name: &str) -> bool {
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => false,
        Expr::Ident(n) => n == name,
        Expr::Select(s) => reads(&s.operand, name),
        Expr::List(l) => l.elements.iter().any(|x| reads(x, name)),
        Expr::Map(m) => m.entries.iter().any(|x| entry_reads(&x.expr, name)),
        Expr::Struct(s) => s.entries.iter().any(|x| entry_reads(&x.expr, name)),
        Expr::Call(c) => {
            c.target.as_deref().is_some_and(|t| reads(t, name))
                || c.args.iter().any(|x| reads(x, name))
        }
        Expr::Comprehension(c) => {
            if reads(&c.iter_range, name) || reads(&c.accu_init, name) {
                return true;
            }
            let shadowed_in_loop =
                c.iter_var == name || c.iter_var2.as_deref() == Some(name) || c.accu_var == name;
            let in_loop =
                !shadowed_in_loop && (reads(&c.loop_cond, name) || reads(&c.loop_step, name));
            let in_result = c.accu_var != name && reads(&c.result, name);
            in_loop || in_result
        }
    }
}

fn entry_reads(e: &EntryExpr, name: &str) -> bool {
    match e {
        EntryExpr::MapEntry(m) => reads(&m.key, name) || reads(&m.value, name),
        EntryExpr::StructField(f) => reads(&f.value, name),
    }
}

/// A loop step's value as `k` times the accumulator plus `len` elements (or bytes) of at most
/// `elem` each.
struct Growth {
    k: u64,
    len: u64,
    elem: u64,
}

/// How a loop step grows the accumulator `accu`, or `Err` where it uses it in a way whose growth
/// is not bounded here.
fn grow<'a>(e: &'a IdedExpr, accu: &str, scope: &mut Scope<'a>) -> Result<Growth, ()> {
    if !reads(e, accu) {
        return bound(e, scope)
            .map(|b| Growth {
                k: 0,
                len: b.len,
                elem: b.elem,
            })
            .map_err(|_| ());
    }
    match &e.expr {
        Expr::Ident(n) if n == accu => Ok(Growth {
            k: 1,
            len: 0,
            elem: 1,
        }),
        Expr::Call(call) if call.target.is_none() => {
            let name = call.func_name.as_str();
            if scalar_result(name) {
                return Ok(Growth {
                    k: 0,
                    len: 1,
                    elem: 1,
                });
            }
            match (name, call.args.as_slice()) {
                (operators::ADD, [a, b]) => {
                    let (a, b) = (grow(a, accu, scope)?, grow(b, accu, scope)?);
                    Ok(Growth {
                        k: a.k + b.k,
                        len: add(a.len, b.len),
                        elem: a.elem.max(b.elem),
                    })
                }
                (operators::CONDITIONAL, [_, a, b]) => {
                    let (a, b) = (grow(a, accu, scope)?, grow(b, accu, scope)?);
                    Ok(Growth {
                        k: a.k.max(b.k),
                        len: a.len.max(b.len),
                        elem: a.elem.max(b.elem),
                    })
                }
                _ => Err(()),
            }
        }
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost_of(source: &str, metrics: &[&str]) -> Result<Bound, String> {
        let env = cel::Env::stdlib();
        let program = env.compile(source).unwrap();
        estimate(program.expression(), metrics)
    }

    /// `depth` comprehensions over ten elements, nested, as in issue 13.
    pub(crate) fn nested(depth: usize) -> String {
        let mut s = "rps > 0".to_string();
        for _ in 0..depth {
            s = format!("[1,2,3,4,5,6,7,8,9,10].all(rps, {s})");
        }
        s
    }

    #[test]
    fn a_scalar_formula_costs_a_few_units() {
        let b = cost_of("max(rps, cpu)", &["rps", "cpu"]).unwrap();
        assert!(b.cost < 20, "{b:?}");
        assert_eq!(b.size(), 1);
    }

    #[test]
    fn nested_comprehensions_multiply() {
        let one = cost_of(&nested(1), &["rps"]).unwrap().cost;
        let two = cost_of(&nested(2), &["rps"]).unwrap().cost;
        assert!(two > one * 10, "{one} {two}");
        assert!(cost_of(&nested(7), &["rps"]).unwrap().cost > MAX_FORMULA_COST);
        assert!(cost_of(&nested(12), &["rps"]).unwrap().cost > MAX_FORMULA_COST);
    }

    #[test]
    fn estimates_of_the_nested_examples() {
        for depth in 1..=12 {
            let b = cost_of(&nested(depth), &["rps"]).unwrap();
            eprintln!("{depth} levels: {} units", b.cost);
        }
        let list = format!("[{}]", vec!["1"; 30].join(","));
        let two = format!("{list}.all(x, {list}.all(y, x + y > 0)) ? rps + 1 : 0");
        eprintln!("30x30: {:?}", cost_of(&two, &["rps"]));
    }

    #[test]
    fn map_grows_the_accumulator_by_one_element_per_iteration() {
        let b = cost_of("[1, 2, 3].map(x, [x, x])", &[]).unwrap();
        // Three iterations, each appending a list of two elements.
        // (The empty list it starts from counts as one.)
        assert_eq!((b.len, b.elem), (4, 2), "{b:?}");
        let f = cost_of("[1, 2, 3].filter(x, x > 1)", &[]).unwrap();
        assert_eq!((f.len, f.elem), (4, 1), "{f:?}");
    }

    #[test]
    fn values_is_as_large_as_the_metric_names() {
        let b = cost_of("values", &["rps", "cpu"]).unwrap();
        assert_eq!((b.len, b.elem), (2, 3));
    }

    #[test]
    fn list_concatenation_in_a_comprehension_is_bounded() {
        // Doubling a list in a loop would be exponential; a macro cannot express it, and
        // concatenations of the range with itself are bounded by the product.
        let b = cost_of(
            "[1,2,3].map(x, [1,2,3] + [1,2,3]).map(y, y + y).size()",
            &[],
        )
        .unwrap();
        assert!(b.cost < MAX_FORMULA_COST, "{b:?}");
    }

    #[test]
    fn shadowing_keeps_the_inner_accumulator_apart() {
        // The inner `all` has its own accumulator; the outer map's still grows by one per step.
        let b = cost_of("[1,2].map(x, [3,4].all(y, y > x))", &[]).unwrap();
        assert!(b.cost < 1000, "{b:?}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::policy::formula::Formula;
    use std::time::Instant;

    /// Prints estimate and time per evaluation of formulas near the limit (`--ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure() {
        let l = |n: usize| format!("[{}]", vec!["1"; n].join(","));
        let cases = [
            format!("{}.all(x, {}.all(y, x + y > 0)) ? 1 : 0", l(30), l(30)),
            format!(
                "{}.all(x, {}.all(y, {}.all(z, x + y + z > 0))) ? 1 : 0",
                l(10),
                l(10),
                l(10)
            ),
            format!(
                "{}.all(a, {}.all(x, {}.all(y, {}.all(z, x + y + z > 0)))) ? 1 : 0",
                l(10),
                l(10),
                l(10),
                l(10)
            ),
            format!("{}.map(x, {}).size() > 0 ? 1 : 0", l(100), l(100)),
            format!(
                "{}.map(x, {}.map(y, 'aaaaaaaaaa' + string(y))).size() > 0 ? 1 : 0",
                l(20),
                l(20)
            ),
            format!(
                "{}.filter(x, x > 0).map(y, y * 2).exists_one(z, z == 2) ? 1 : 0",
                l(300)
            ),
            format!(
                "{}.map(x, {}.map(y, {}.map(z, [x, y, z]))).size() > 0 ? 1 : 0",
                l(10),
                l(10),
                l(10)
            ),
        ];
        for source in cases {
            let program = cel::Env::stdlib().compile(&source).unwrap();
            let b = estimate(program.expression(), &["x", "y", "z", "a"]).unwrap();
            let names = ["x", "y", "z", "a"];
            let f = Formula::compile(&source, &names);
            let Ok(f) = f else {
                eprintln!("{:>10} units: refused {f:?}", b.cost);
                continue;
            };
            let started = Instant::now();
            for _ in 0..10 {
                f.evaluate(&[1, 1, 1, 1], &[1.0; 4], 1, 1).unwrap();
            }
            let per = started.elapsed() / 10;
            eprintln!(
                "{:>10} units: {per:?} ({:.1} ns/unit) {}",
                b.cost,
                per.as_nanos() as f64 / b.cost as f64,
                &source[..40.min(source.len())]
            );
        }
    }
}
