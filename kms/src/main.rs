//! The `kms` binary: see `kms --help` and docs/operator.md.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kms::cli::main()
}
