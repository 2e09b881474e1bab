//! `minitron-convert`: convert a checkpoint (`MODEL --to TARGET --out PATH`), or inspect and
//! synthesise checkpoints.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use minitron::model::synth::{write_checkpoint_with, Preset};
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
    /// Output folder (with several targets: one subfolder per target).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace existing output folders.
    #[arg(long)]
    force: bool,
    /// How FP8 weights are chosen: rtn (round to nearest, as llm-compressor), search
    /// (per-channel clipping search weighted by calibration statistics) or gptq (error feedback
    /// through the calibration inputs' second moments).
    #[arg(long, default_value = "rtn", value_parser = ["rtn", "search", "gptq"])]
    fp8_weights: String,
    /// How W8A8 weights are rounded after smoothing: `rtn` (nearest), or `gptq` (error feedback
    /// through the smoothed calibration inputs' second moments).
    #[arg(long, default_value = "rtn", value_parser = ["rtn", "gptq"])]
    int8_weights: String,
    /// SmoothQuant migration strength for --to int8: a number in (0, 1), or `auto` to choose it
    /// per layer from 0.3 … 0.9 by the calibrated output error.
    #[arg(long, default_value = "0.8")]
    smooth_alpha: String,
    /// Scales per this many input columns for --to int8-w8a16 (default: one per output channel).
    #[arg(long)]
    group_size: Option<usize>,
    /// GGUF: importance matrix (llama.cpp's GGUF or legacy .dat format) for the quantizers.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// GGUF: override the type of tensors whose name matches REGEX (repeatable; last match wins).
    #[arg(long, value_name = "REGEX=TYPE")]
    tensor_type: Vec<String>,
    /// GGUF: type of output.weight (or of the tied token embedding).
    #[arg(long, value_name = "TYPE")]
    output_type: Option<String>,
    /// GGUF: type of token_embd.weight.
    #[arg(long, value_name = "TYPE")]
    embedding_type: Option<String>,
    /// GGUF: tokenizer.ggml.pre when it cannot be detected from tokenizer.json.
    #[arg(long, value_name = "NAME")]
    gguf_pre: Option<String>,
    #[command(flatten)]
    calib: CalibArgs,
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
    /// Compute an importance matrix (llama.cpp's GGUF imatrix format) from calibration text.
    Imatrix {
        /// Input checkpoint folder (bf16 Hugging Face safetensors).
        model: PathBuf,
        /// Output file (`.imatrix` / `.gguf`).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        calib: CalibArgs,
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
        /// Copy tokenizer.json and tokenizer_config.json from this folder instead of building
        /// the synthetic tokenizer (e.g. the real Llama-3 tokenizer).
        #[arg(long, value_name = "DIR")]
        tokenizer: Option<PathBuf>,
    },
    /// Print a GGUF file's metadata and tensor table.
    Dump {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print long arrays whole instead of their first values.
        #[arg(long)]
        full: bool,
    },
}

/// Calibration options shared by every command that calibrates.
#[derive(clap::Args, Debug)]
struct CalibArgs {
    /// Calibration text: plain text, or JSONL with a `text` field per line (default: built-in corpus).
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Number of chunks (the first N consecutive chunks of the text unless --calib-shuffle).
    #[arg(long, default_value_t = 64)]
    calib_samples: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    calib_seq: usize,
    /// Draw the chunks at random (without replacement) with this seed.
    #[arg(long, value_name = "SEED")]
    calib_shuffle: Option<u64>,
    /// Save the calibration statistics (safetensors) for reuse.
    #[arg(long, value_name = "FILE")]
    save_calib: Option<PathBuf>,
    /// Reuse statistics saved by --save-calib instead of running the model.
    #[arg(long, value_name = "FILE", conflicts_with = "calib")]
    load_calib: Option<PathBuf>,
}

impl CalibArgs {
    fn options(&self) -> minitron::calib::CalibOptions {
        minitron::calib::CalibOptions {
            calib: self.calib.clone(),
            spec: minitron::calib::CalibSpec {
                samples: self.calib_samples,
                seq_len: self.calib_seq,
                shuffle: self.calib_shuffle,
            },
            load: self.load_calib.clone(),
            save: self.save_calib.clone(),
        }
    }
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
            Some(Cmd::Imatrix { model, out, calib }) => {
                let ck = Checkpoint::open(&model)?;
                let stats =
                    minitron::calib::calibrate(&ck, &calib.options(), &candle_core::Device::Cpu)?;
                let im = minitron::calib::Imatrix::from_stats(&stats);
                im.write_gguf(&out)
                    .with_context(|| format!("writing {}", out.display()))?;
                let i = &stats.info;
                println!(
                    "wrote {} ({} entries) from {} chunks × {} tokens of {} (sha256 {}…): {} tokens, {:.1} s, {:.0} tokens/s",
                    out.display(),
                    im.entries.len(),
                    i.samples,
                    i.seq_len,
                    i.source,
                    &i.sha256[..12],
                    i.tokens,
                    i.wall_s,
                    i.tokens as f64 / i.wall_s.max(1e-9)
                );
                Ok(())
            }
            Some(Cmd::Dump { file, json, full }) => {
                let g = minitron::format::gguf::GgufFile::open(&file)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&minitron::inspect::gguf_json(&g, full))?
                    );
                } else {
                    print!("{}", minitron::inspect::gguf_text(&g, full));
                }
                Ok(())
            }
            Some(Cmd::Synth {
                preset,
                seed,
                out,
                force,
                tokenizer,
            }) => {
                let preset = Preset::parse(&preset)?;
                let pb = minitron::progress::bar(0, "synth", true);
                let s = write_checkpoint_with(
                    preset,
                    seed,
                    &out,
                    force,
                    tokenizer.as_deref(),
                    &|done, total| {
                        pb.set_length(total);
                        pb.set_position(done);
                    },
                )
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
                let Some(model) = cli.model.clone() else {
                    bail!("give a MODEL folder with --to TARGET --out PATH, or a subcommand (see --help)");
                };
                let Some(to) = cli.to.clone() else {
                    bail!("--to TARGET is required");
                };
                let Some(out) = cli.out.clone() else {
                    bail!("--out PATH is required");
                };
                let all: Vec<&str> = to.split(',').map(str::trim).collect();
                let ggufs = all
                    .iter()
                    .filter_map(|t| t.strip_prefix("gguf:"))
                    .map(minitron::gguf_export::Mix::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                let targets = all
                    .iter()
                    .filter(|t| !t.starts_with("gguf:"))
                    .map(|t| minitron::convert::Target::parse(t))
                    .collect::<Result<Vec<_>, _>>()?;
                let ck = Checkpoint::open(&model)?;
                if !ggufs.is_empty() {
                    let single = all.len() == 1;
                    export_ggufs(&cli, &ck, &ggufs, &out, single)?;
                    if targets.is_empty() {
                        return Ok(());
                    }
                }
                let opts = minitron::convert::ConvertOptions {
                    targets,
                    out: out.clone(),
                    force: cli.force,
                    fp8_weights: minitron::quant::fp8::WeightMode::parse(&cli.fp8_weights)?,
                    int8_weights: minitron::quant::fp8::WeightMode::parse(&cli.int8_weights)?,
                    smooth_alpha: match cli.smooth_alpha.as_str() {
                        "auto" => None,
                        a => {
                            let v: f64 = a.parse().map_err(|_| {
                                anyhow::anyhow!(
                                    "--smooth-alpha: expected a number or auto, found `{a}`"
                                )
                            })?;
                            if !(v > 0.0 && v < 1.0) {
                                bail!("--smooth-alpha must be in (0, 1), found {v}");
                            }
                            Some(v)
                        }
                    },
                    group_size: cli.group_size,
                    calib: cli.calib.options(),
                    command_line: common::command_line(),
                };
                let pb = minitron::progress::bar(0, "convert", false);
                let manifests =
                    minitron::convert::run(&ck, &opts, &candle_core::Device::Cpu, &|d, t| {
                        pb.set_length(t);
                        pb.set_position(d);
                    })?;
                pb.finish_and_clear();
                for (m, t) in manifests.iter().zip(&opts.targets) {
                    let dir = minitron::convert::target_dir(&opts, *t);
                    let worst = &m["tensor_error"]["worst"];
                    println!(
                        "wrote {} ({}, {} in {} files, {:.1} s); worst tensor error {:.4} % relative RMS ({})",
                        dir.display(),
                        t.name(),
                        minitron::inspect::human_bytes(m["total_bytes"].as_u64().unwrap_or(0)),
                        m["files"].as_array().map_or(0, |f| f.len()),
                        m["wall_s"].as_f64().unwrap_or(0.0),
                        100.0 * worst["relative_rms"].as_f64().unwrap_or(0.0),
                        worst["tensor"].as_str().unwrap_or("-")
                    );
                }
                Ok(())
            }
        }
    })
}

/// Writes one GGUF file per mix: `out` itself for a single target, else `out/<mix>.gguf`.
fn export_ggufs(
    cli: &Cli,
    ck: &Checkpoint,
    mixes: &[minitron::gguf_export::Mix],
    out: &std::path::Path,
    single: bool,
) -> anyhow::Result<()> {
    use minitron::format::gguf::GgmlType;
    let parse_ty = |s: &str| -> anyhow::Result<GgmlType> {
        GgmlType::from_name(s).ok_or_else(|| anyhow::anyhow!("unknown ggml type `{s}`"))
    };
    let overrides = cli
        .tensor_type
        .iter()
        .map(|o| {
            let (re, t) = o.rsplit_once('=').ok_or_else(|| {
                anyhow::anyhow!("--tensor-type: expected REGEX=TYPE, found `{o}`")
            })?;
            Ok((re.to_string(), parse_ty(t)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let imatrix = match (&cli.imatrix, &cli.calib.calib) {
        (Some(p), _) => Some(minitron::gguf_export::ImatrixUse {
            imatrix: minitron::calib::Imatrix::read(p)?,
            file: p.display().to_string(),
        }),
        (None, Some(text)) => {
            let stats =
                minitron::calib::calibrate(ck, &cli.calib.options(), &candle_core::Device::Cpu)?;
            let mut im = minitron::calib::Imatrix::from_stats(&stats);
            if im.datasets.is_empty() {
                im.datasets.push(text.display().to_string());
            }
            Some(minitron::gguf_export::ImatrixUse {
                imatrix: im,
                file: format!("(computed from {})", text.display()),
            })
        }
        _ => None,
    };
    for &mix in mixes {
        let path = if single {
            out.to_path_buf()
        } else {
            out.join(format!("{}.gguf", mix.name()))
        };
        let o = minitron::gguf_export::GgufOptions {
            mix,
            overrides: overrides.clone(),
            output_type: cli.output_type.as_deref().map(parse_ty).transpose()?,
            embedding_type: cli.embedding_type.as_deref().map(parse_ty).transpose()?,
            imatrix: imatrix.clone(),
            pre: cli.gguf_pre.clone(),
            force: cli.force,
            command_line: common::command_line(),
        };
        let pb = minitron::progress::bar(0, "gguf", false);
        let r = minitron::gguf_export::export(ck, &o, &path, &|d, t| {
            pb.set_length(t);
            pb.set_position(d);
        })
        .with_context(|| format!("writing {}", path.display()))?;
        pb.finish_and_clear();
        let mut counts = std::collections::BTreeMap::new();
        for (_, t) in &r.tensors {
            *counts.entry(t.clone()).or_insert(0usize) += 1;
        }
        let mix_desc: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
        println!(
            "wrote {} (gguf:{}, {}, {} tensors: {}; {:.1} s)",
            path.display(),
            mix.name(),
            minitron::inspect::human_bytes(r.bytes),
            r.tensors.len(),
            mix_desc.join(", "),
            r.wall_s
        );
    }
    Ok(())
}
