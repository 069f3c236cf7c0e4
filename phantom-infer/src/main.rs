//! `phantom-infer`: run Phantom checkpoints from the command line.

mod allocator;
mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cli::Cli::parse().run()
}
