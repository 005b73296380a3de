//! The `idsync` binary: a thin shell over `idsync-agent`.

fn main() -> std::process::ExitCode {
    idsync_agent::main()
}
