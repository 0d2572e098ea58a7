//! Every figure in a README table is re-made here from the command beside it, with this build's
//! binary in place of `cargo run --release --`:
//! - `README.md`'s table of the recommended policy against the HPA on every trace is the output
//!   of the `scripts/trace-table ...` command named in the comment above it, line for line;
//! - `deploy/examples/scalable-backend/README.md`'s backtest table holds the figures the shell
//!   block above it prints, rounded as the table prints them.
//!
//! Debug build: the trace table replays about 2 million evaluations per policy (nyc_taxi alone
//! 1.2 million); both tests took 133 s here, on a shared, loaded two-core machine.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `script` with bash in the repository, `cargo run --release --` meaning this build's
/// binary (and `KSCALE` naming it for the scripts), and returns its standard output.
fn run_documented(script: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_kscale");
    let script = script.replace("cargo run --release --", bin);
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(root())
        .env("KSCALE", bin)
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(
        out.status.success(),
        "{script}\nfailed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's table over the traces: the lines between `<!-- made by: COMMAND -->` and
/// `<!-- end of table -->` are exactly what COMMAND prints.
#[test]
fn readme_trace_table_is_what_its_command_prints() {
    let readme = read(&root().join("README.md"));
    let (_, rest) = readme
        .split_once("<!-- made by: ")
        .expect("README.md has a table marked `<!-- made by: COMMAND -->`");
    let (command, rest) = rest.split_once(" -->\n").expect("the marker ends with -->");
    let (table, _) = rest
        .split_once("<!-- end of table -->")
        .expect("the table ends with `<!-- end of table -->`");
    assert!(
        command.starts_with("scripts/trace-table"),
        "unexpected command {command:?}"
    );
    let printed = run_documented(command);
    assert_eq!(
        table.trim(),
        printed.trim(),
        "README.md's table differs from what `{command}` prints now: paste its output"
    );
}

/// The figures a backtest summary prints, by row label.
#[derive(Debug)]
struct Figures {
    replica_hours: f64,
    actions: f64,
    slo_minutes: f64,
}

fn summaries(output: &str) -> Vec<Figures> {
    let first_number = |line: &str, label: &str| -> f64 {
        let rest = line.trim_start_matches(label).trim_start();
        let word = rest.split_whitespace().next().unwrap_or_default();
        word.parse()
            .unwrap_or_else(|e| panic!("{label}: {word:?}: {e}"))
    };
    let mut out = Vec::new();
    let (mut rh, mut act) = (None, None);
    for line in output.lines() {
        if line.starts_with("replica-hours ") {
            rh = Some(first_number(line, "replica-hours"));
        } else if line.starts_with("scaling actions ") {
            act = Some(first_number(line, "scaling actions"));
        } else if line.starts_with("SLO-violation minutes ") {
            let slo = first_number(line, "SLO-violation minutes");
            out.push(Figures {
                replica_hours: rh
                    .take()
                    .expect("replica-hours before SLO-violation minutes"),
                actions: act
                    .take()
                    .expect("scaling actions before SLO-violation minutes"),
                slo_minutes: slo,
            });
        }
    }
    out
}

/// Whether `printed` rounds to `documented` at the documented number's decimals.
fn same_as_printed(documented: &str, printed: f64) -> bool {
    let decimals = documented.split_once('.').map_or(0, |(_, d)| d.len());
    let documented: f64 = documented
        .parse()
        .unwrap_or_else(|e| panic!("{documented:?}: {e}"));
    format!("{printed:.decimals$}").parse::<f64>().ok() == Some(documented)
}

/// The scalable-backend example's backtest table: the shell block under "Backtest both" prints
/// the summaries of (a), (b) and the CPU HPA, in that order (scratch files in a folder of this
/// test's own instead of /tmp, so concurrent runs do not share them).
#[test]
fn scalable_backend_backtest_table_is_what_its_commands_print() {
    let path = root().join("deploy/examples/scalable-backend/README.md");
    let readme = read(&path);
    let (_, section) = readme
        .split_once("## Backtest both")
        .expect("the example README has a `## Backtest both` section");
    let (_, block) = section.split_once("```sh\n").expect("a sh block");
    let (block, after) = block.split_once("```").expect("the sh block ends");
    let scratch = root()
        .join("target")
        .join(format!("documented-figures-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch folder");
    let script = block.replace("/tmp/", &format!("{}/", scratch.display()));
    let printed = summaries(&run_documented(&script));
    let _ = std::fs::remove_dir_all(&scratch);
    let rows: Vec<Vec<&str>> = after
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| policy"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 3, "three rows: HPA, (a), (b): {rows:?}");
    assert_eq!(
        printed.len(),
        3,
        "three summaries: (a), (b), HPA: {printed:?}"
    );
    // The block prints (a), (b), then the HPA; the table lists the HPA first.
    for (row, figures) in rows.iter().zip([&printed[2], &printed[0], &printed[1]]) {
        let [name, rh, actions, slo] = row.as_slice() else {
            panic!("row {row:?}: policy | replica-hours | scaling actions | SLO-violation minutes");
        };
        assert!(
            same_as_printed(rh, figures.replica_hours)
                && same_as_printed(actions, figures.actions)
                && same_as_printed(slo, figures.slo_minutes),
            "{}: the row for {name} says {rh} / {actions} / {slo}, the commands print {figures:?}",
            path.display()
        );
    }
}
