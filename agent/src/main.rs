use clap::Parser as _;
use ferry_agent::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.log.init().and_then(|()| ferry_agent::run(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-agent: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
