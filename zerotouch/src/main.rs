//! The `zerotouch` binary: the service's command line (`zerotouch_service::cli`) plus
//! `zerotouch simulate` (`zerotouch_simulate`). It is a crate of its own so that the server
//! library does not depend on the device-side client and its MQTT stack; it only composes the
//! two command trees and must never hold logic of its own.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zerotouch_service::cli;
use zerotouch_simulate::SimulateArgs;

#[derive(Debug, Parser)]
#[command(
    name = "zerotouch",
    version,
    about = "Zero-touch device provisioning and PKI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Service(Box<cli::Command>),
    /// Simulate devices: provision, connect to the hub, send telemetry and twin updates.
    Simulate(Box<SimulateArgs>),
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Service(command) => cli::run(cli::Cli { command: *command }),
        Command::Simulate(args) => zerotouch_simulate::run(*args),
    };
    cli::exit(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every verb and flag of the whole binary, `simulate` included, has help (docs/cli.md).
    #[test]
    fn every_verb_and_flag_has_help() {
        let missing = cli::undocumented(&Cli::command());
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
        let simulate_flags = Cli::command()
            .find_subcommand("simulate")
            .map_or(0, |verb| verb.get_arguments().count());
        assert!(
            simulate_flags > 10,
            "simulate and its flags are in the tree"
        );
    }
}
