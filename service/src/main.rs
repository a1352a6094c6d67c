//! The `zerotouch` binary: see `zerotouch --help`.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = zerotouch_service::cli::Cli::parse();
    match zerotouch_service::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zerotouch: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
