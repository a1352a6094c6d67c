//! The `zerotouch` binary: see `zerotouch --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    zerotouch_service::cli::main()
}
