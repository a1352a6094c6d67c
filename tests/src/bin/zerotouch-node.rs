//! The `zerotouch` program under another name (without `simulate`, which the `zerotouch`
//! package adds), so that integration tests of this package can start it as a separate process
//! (`CARGO_BIN_EXE_zerotouch-node`): cargo builds a package's own binaries for its tests, not
//! those of its dependencies.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    zerotouch_service::cli::main()
}
