//! The `kscale` binary: parse the command line, run it, report errors.

use std::process::ExitCode;

use clap::Parser;
use kscale::cli::{Cli, CliError, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match execute(cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::ValidationFailed(n)) => {
            eprintln!(
                "kscale: {n} invalid {}",
                if n == 1 { "policy" } else { "policies" }
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kscale: {e}");
            ExitCode::FAILURE
        }
    }
}
