//! `runv-vmm`: the built-in VMM alone, the same as `runv vmm` in a binary
//! that links nothing else in, so the process the sandbox keeps running
//! next to each guest stays small.

use clap::Parser;

/// The built-in VMM: one KVM microVM in this process (see `runv vmm --help`).
#[derive(Parser)]
#[command(name = "runv-vmm", version)]
struct Cli {
    #[command(flatten)]
    args: runv::vmm::process::VmmArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match runv::config::Config::load(None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runv-vmm: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runv::vmm::process::main(cli.args, &config)
}
