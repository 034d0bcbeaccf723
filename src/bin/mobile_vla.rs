//! `mobile_vla` command-line tool: dataset, model and inference commands.

fn main() -> std::process::ExitCode {
    mobile_vla::cli::main()
}
