//! `membarrier-trace symbolize FILE`: a saved JSON report named on a machine that has the
//! symbols. Every frame and caller left without a symbol (a stripped module, its debug file
//! not on the traced box) carries its module's build ID and its module offset; the build's
//! debug file, found by that ID, or the module itself where it is the same build, names it.

use std::{
    io::{BufRead as _, Write as _},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    app::cli::{EXIT_STDOUT_CLOSED, SymbolizeCli},
    enrich::symbolize::Symbols,
    model::Caller,
};

pub fn run(cli: &SymbolizeCli) -> Result<ExitCode> {
    let input: Box<dyn std::io::BufRead> = if cli.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&cli.file)
            .with_context(|| format!("opening {}", cli.file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut symbols = Symbols::new(&cli.debug_dir);
    let (mut named, mut unnamed) = (0, 0);
    let mut out = std::io::stdout().lock();
    for (n, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", cli.file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut doc: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a JSON document (-o json writes one per line)",
                cli.file.display(),
                n + 1
            )
        })?;
        name_all(&mut doc, &mut symbols, &mut named, &mut unnamed);
        if let Err(e) = writeln!(out, "{doc}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::from(EXIT_STDOUT_CLOSED));
            }
            return Err(e).context("writing to stdout");
        }
    }
    if out.flush().is_err() {
        return Ok(ExitCode::from(EXIT_STDOUT_CLOSED));
    }
    eprintln!(
        "membarrier-trace: symbolize: named {named} of {} frames and callers without a symbol",
        named + unnamed
    );
    Ok(ExitCode::SUCCESS)
}

/// Names, anywhere in `v`, each frame or caller (an object with `address`, `build_id` and
/// `module_offset`) whose `symbol` is null.
fn name_all(v: &mut Value, symbols: &mut Symbols, named: &mut u64, unnamed: &mut u64) {
    match v {
        Value::Array(items) => {
            for item in items {
                name_all(item, symbols, named, unnamed);
            }
        }
        Value::Object(o) => {
            let frame = o.contains_key("address") && o.contains_key("module_offset");
            if frame && o.get("symbol").is_some_and(Value::is_null) {
                let mut c = Caller {
                    build_id: o["build_id"].as_str().map(str::to_string),
                    module_offset: o["module_offset"].as_u64(),
                    module: o.get("module").and_then(Value::as_str).map(str::to_string),
                    ..Default::default()
                };
                if symbols.name_saved(&mut c) {
                    *named += 1;
                    o.insert("symbol".into(), c.symbol.into());
                    o.insert("offset".into(), c.offset.into());
                    o.insert("file".into(), c.file.into());
                    o.insert("line".into(), c.line.into());
                } else {
                    *unnamed += 1;
                }
            }
            for item in o.values_mut() {
                name_all(item, symbols, named, unnamed);
            }
        }
        _ => {}
    }
}
