//! Writes membarrier-trace's man page and shell completions into a directory, from the clap
//! definition the binary parses with: `membarrier-trace-docs DIR` (used by `cargo xtask dist`).

use std::{fs, io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::CommandFactory as _;
use clap_complete::Shell;
use membarrier_trace::app::cli::{Cli, EXIT_CODES};

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        bail!("usage: membarrier-trace-docs DIR");
    };
    let dir = PathBuf::from(dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The exit statuses get a section of their own, not --help's text.
    let cmd = Cli::command().after_long_help(None::<&str>);
    // Section 8: system administration (it runs as root).
    let man = clap_mangen::Man::new(cmd.clone()).section("8");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    writeln!(page, ".SH \"EXIT STATUS\"")?;
    for (code, what) in EXIT_CODES {
        writeln!(page, ".TP\n{code}\n{}", what.replace('-', "\\-"))?;
    }
    man.render_version_section(&mut page)?;
    fs::write(dir.join("membarrier-trace.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "membarrier-trace", &dir)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    Ok(())
}
