//! `minitron-convert`: convert a checkpoint (`MODEL --to TARGET --out PATH`), or inspect and
//! synthesise checkpoints.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use minitron::model::synth::{write_checkpoint, Preset};
use minitron::model::Checkpoint;

/// Turn a bf16 Llama-3.x checkpoint into quantized artifacts.
#[derive(Parser, Debug)]
#[command(
    name = "minitron-convert",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Input checkpoint folder (bf16 Hugging Face safetensors).
    model: Option<PathBuf>,
    /// Target format(s), comma-separated.
    #[arg(long)]
    to: Option<String>,
    /// Output path.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Worker threads (default: all logical CPUs).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show what a checkpoint folder holds.
    Inspect {
        dir: PathBuf,
        /// List every tensor.
        #[arg(long)]
        verbose: bool,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write a deterministic random-weight bf16 checkpoint.
    Synth {
        /// tiny or minitron-4b-depth.
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output folder.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    common::exit_on_error(|| {
        let cli = Cli::parse();
        common::set_threads(cli.threads);
        match cli.cmd {
            Some(Cmd::Inspect { dir, verbose, json }) => {
                let ck = Checkpoint::open(&dir)?;
                let r = minitron::inspect::report(&ck, verbose)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", minitron::inspect::table(&r));
                }
                Ok(())
            }
            Some(Cmd::Synth {
                preset,
                seed,
                out,
                force,
            }) => {
                let preset = Preset::parse(&preset)?;
                let pb = minitron::progress::bar(0, "synth", true);
                let s = write_checkpoint(preset, seed, &out, force, &|done, total| {
                    pb.set_length(total);
                    pb.set_position(done);
                })
                .with_context(|| format!("writing {}", out.display()))?;
                pb.finish_and_clear();
                println!(
                    "wrote {} ({} parameters, {} in {} weight file{})",
                    out.display(),
                    minitron::inspect::group_digits(s.parameters),
                    minitron::inspect::human_bytes(s.total_bytes),
                    s.files.len(),
                    if s.files.len() == 1 { "" } else { "s" }
                );
                Ok(())
            }
            None => {
                let Some(model) = cli.model else {
                    bail!("give a MODEL folder with --to TARGET --out PATH, or a subcommand (see --help)");
                };
                let Some(to) = cli.to else {
                    bail!("--to TARGET is required");
                };
                let _ = (model, cli.out);
                bail!("unknown target `{to}`: no conversion targets are available in this version yet")
            }
        }
    })
}
