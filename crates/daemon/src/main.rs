//! The `verged` executable: see [`verge_daemon::cli`].

fn main() -> std::process::ExitCode {
    verge_daemon::cli::main(std::env::args_os())
}
