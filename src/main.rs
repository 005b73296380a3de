//! The `idsync` binary: a thin shell over `idsync-agent`.
//!
//! It uses mimalloc as the global allocator: a batch builds and drops millions of small
//! attribute maps, strings and rule values, and glibc's allocator spent a tenth of the
//! pipeline's time consolidating its free lists.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    idsync_agent::main()
}
