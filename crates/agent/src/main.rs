//! The `verge-agent` executable: see [`verge_agent::cli`].

fn main() -> std::process::ExitCode {
    verge_agent::cli::main(std::env::args_os())
}
