//! The `zerotouch` binary: the service's command line (`zerotouch_service::cli`) plus
//! `zerotouch simulate` (`zerotouch_simulate`). It is a crate of its own so that the server
//! library does not depend on the device-side client and its MQTT stack; it only composes the
//! two command trees and must never hold logic of its own.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
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
    /// Print a shell completion script: `source <(zerotouch completions bash)`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (zerotouch.1, zerotouch-serve.1, …) into a folder.
    Manpages {
        /// The folder to write them into (created if missing).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Service(command) => cli::run(cli::Cli { command: *command }),
        Command::Simulate(args) => zerotouch_simulate::run(*args),
        Command::Completions { shell } => print(&completions(shell)),
        Command::Manpages { dir } => manpages(&dir),
    };
    cli::exit(outcome)
}

/// The completion script of the whole command tree, `simulate` included. (Generated into
/// memory: clap_complete panics when its writer fails, as stdout does into a closed pipe.)
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "zerotouch", &mut script);
    script
}

/// Writes to stdout; a reader that went away (`| head`) is not a failure.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// One page per verb, named as `man` looks them up: `zerotouch-enrollment-create.1`.
fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    // `file` is the page's name (`zerotouch-enrollment-create`), `spoken` the command as typed
    // (`zerotouch enrollment create`), which the page's NAME and SYNOPSIS show.
    fn write(command: &clap::Command, file: &str, spoken: &str, dir: &Path) -> anyhow::Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone().name(spoken.to_string()))
            .title(file.to_string())
            .render(&mut page)?;
        std::fs::write(dir.join(format!("{file}.1")), page)?;
        for sub in command.get_subcommands() {
            let name = sub.get_name();
            write(
                sub,
                &format!("{file}-{name}"),
                &format!("{spoken} {name}"),
                dir,
            )?;
        }
        Ok(())
    }
    write(&Cli::command(), "zerotouch", "zerotouch", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bash script names every verb, and bash accepts it.
    #[test]
    fn completions_cover_the_tree_and_parse() {
        let text = String::from_utf8(completions(clap_complete::Shell::Bash)).unwrap();
        for verb in [
            "serve",
            "enrollment",
            "simulate",
            "rotate-intermediate",
            "completions",
        ] {
            assert!(text.contains(verb), "{verb} missing");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zerotouch.bash");
        std::fs::write(&path, &text).unwrap();
        let status = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "bash -n refused the completion script");
    }

    #[test]
    fn a_manual_page_per_verb() {
        let dir = tempfile::tempdir().unwrap();
        manpages(dir.path()).unwrap();
        for page in [
            "zerotouch.1",
            "zerotouch-serve.1",
            "zerotouch-enrollment-create.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{page}: {text:.80}"
            );
        }
        let page = std::fs::read_to_string(dir.path().join("zerotouch-serve.1")).unwrap();
        assert!(page.contains("role"), "serve's flags are on its page");
    }

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
