//! The binary: parse the command line and hand over to the library.

fn main() -> std::process::ExitCode {
    egress_guard::cli::main()
}
