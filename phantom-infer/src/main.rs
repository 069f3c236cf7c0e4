//! `phantom-infer`: run Phantom checkpoints from the command line.

mod cli;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    cli::Cli::parse().run()
}
