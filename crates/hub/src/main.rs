//! The `verge-hub` executable: see [`verge_hub::cli`].

fn main() -> std::process::ExitCode {
    verge_hub::cli::main(std::env::args_os())
}
