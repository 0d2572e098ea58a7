//! The `kscale` binary: parse the command line, run it, report errors.

use std::process::ExitCode;

use kscale::cli::{CliError, execute};
use kscale::config::ConfigError;

fn main() -> ExitCode {
    let cli = match kscale::config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        // Help, version and usage errors print as clap prints them.
        Err(ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("kscale: {e}");
            return ExitCode::FAILURE;
        }
    };
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
