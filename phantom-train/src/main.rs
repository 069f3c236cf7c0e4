//! `phantom-train`: Phantom Optimization from the command line.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cli::Cli::parse().run()
}
