use clap::Parser as _;
use ferry_agent::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.log.init().and_then(|()| ferry_agent::run(args)),
        Command::Inspect(args) => ferry_agent::inspect::run(args.admin_addr, args.view, args.raw)
            .map_err(anyhow::Error::from),
        Command::Crd => {
            print!("{}", ferry_proto::policy::crd_manifest());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-agent: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
