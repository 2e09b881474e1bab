//! `minitron-convert`: convert a checkpoint (`MODEL --to TARGET --out PATH`), or inspect and
//! synthesise checkpoints.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use minitron::export::{Artifact, ExportOptions, GgufSettings, Target};
use minitron::format::gguf::GgmlType;
use minitron::model::synth::{write_checkpoint_with, Preset};
use minitron::model::Checkpoint;
use minitron::quant::fp8::WeightMode;
use minitron::quant::ggml::KSearch;

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
    /// Target format(s), comma-separated (one artifact each; with several, --out is a folder
    /// holding `<target>/` checkpoint folders and `<model>-<TYPE>.gguf` files).
    #[arg(long, value_delimiter = ',', value_name = "TARGET[,TARGET…]", value_parser = TargetNames)]
    to: Vec<String>,
    /// Output path: the artifact itself for one target (a folder, or a `.gguf` file); for several,
    /// a folder holding `<target>/` checkpoint folders and `<model>-<TYPE>.gguf` files.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace existing artifacts (only ones this tool wrote).
    #[arg(long)]
    force: bool,
    /// Continue a killed or interrupted run of the same command from its journal (the
    /// `.OUT.resume.partial` folder beside --out): blocks already written are kept, and the
    /// output is byte for byte what an uninterrupted run writes. Without a journal the run
    /// starts from the beginning.
    #[arg(long)]
    resume: bool,
    /// Seconds between two journal records for --resume, each taken between two blocks
    /// (0: after every block). A record syncs the outputs and saves the calibration's hidden
    /// states.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    journal_every: u64,
    /// Convert weights that hold NaN or infinite values (refused by default, naming the tensor
    /// and the first such value).
    #[arg(long)]
    allow_nonfinite: bool,
    /// How FP8 weights are chosen: rtn (round to nearest, as llm-compressor), search
    /// (per-channel clipping search weighted by calibration statistics) or gptq (error feedback
    /// through the calibration inputs' second moments). FP8 targets only [default: rtn].
    #[arg(long, value_enum, value_name = "MODE")]
    fp8_weights: Option<WeightMode>,
    /// How W8A8 weights are rounded after smoothing: `rtn` (nearest), or `gptq` (error feedback
    /// through the smoothed calibration inputs' second moments). int8 only [default: rtn].
    #[arg(long, value_name = "MODE", value_parser = ["rtn", "gptq"])]
    int8_weights: Option<String>,
    /// How W4A16 weights are chosen: `rtn` (nearest under the absmax scales, as llm-compressor
    /// rounds), `gptq` (group scales searched by calibrated error, error feedback through the
    /// calibration inputs' second moments with their correlations shrunk, scales refitted to
    /// the codes) or `awq` (activation-aware per-channel
    /// scales folded into the norms, v_proj and up_proj, searched per input, then the same scale
    /// search). w4a16 only [default: rtn].
    #[arg(long, value_name = "MODE", value_parser = ["rtn", "gptq", "awq"])]
    int4_weights: Option<String>,
    /// What each block is calibrated on: `original` (the bf16 blocks' outputs) or `quantized`
    /// (the outputs of the blocks before it as already quantized, as GPTQ's paper and
    /// llm-compressor's sequential pipeline do). `quantized` needs exactly one calibrated
    /// checkpoint target [default: per mode, see README].
    #[arg(long, value_name = "INPUTS", value_parser = ["original", "quantized"])]
    calib_inputs: Option<String>,
    /// SmoothQuant migration strength for --to int8: a number in (0, 1), or `auto` to choose it
    /// per layer from 0.3 … 0.9 by the calibrated output error [default: 0.8].
    #[arg(long, value_name = "ALPHA|auto")]
    smooth_alpha: Option<String>,
    /// Scales per this many input columns: --to int8-w8a16 (default: one per output channel) and
    /// w4a16 (default: 128).
    #[arg(long, value_name = "N")]
    group_size: Option<usize>,
    /// GGUF: importance matrix (llama.cpp's GGUF or legacy .dat format) for the quantizers.
    /// Without it, GGUF k-quants use one made from this run's calibration when any --calib*
    /// option is given.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// GGUF: override the type of tensors whose name matches REGEX (repeatable; last match wins).
    #[arg(long, value_name = "REGEX=TYPE")]
    tensor_type: Vec<String>,
    /// GGUF: type of output.weight (or of the tied token embedding).
    #[arg(long, value_name = "TYPE")]
    output_type: Option<GgmlType>,
    /// GGUF: type of token_embd.weight.
    #[arg(long, value_name = "TYPE")]
    embedding_type: Option<GgmlType>,
    /// GGUF: tokenizer.ggml.pre when it cannot be detected from tokenizer.json.
    #[arg(long, value_name = "NAME")]
    gguf_pre: Option<String>,
    /// GGUF: how the k-quant types (Q2_K … Q6_K) encode each block: `reference` (one
    /// encoding: the reference rounding, or llama.cpp's importance-weighted search with an
    /// imatrix) or `best` (several candidates, the lowest importance-weighted error kept per
    /// block: slightly lower error, several times slower) [default: reference].
    #[arg(long, value_enum, value_name = "MODE")]
    gguf_search: Option<KSearch>,
    /// gguf:auto: file budget in bits per weight (8 × tensor bytes ÷ parameters, every tensor
    /// counted, embedding and head included).
    #[arg(long, value_name = "BITS", conflicts_with_all = ["size", "recipe"])]
    bpw: Option<f64>,
    /// gguf:auto: file budget in bytes (the whole file).
    #[arg(long, value_name = "BYTES", conflicts_with = "recipe")]
    size: Option<u64>,
    /// gguf:auto: take the per-tensor types from FILE (`PATTERN=TYPE` entries, as written
    /// beside an earlier result or given to llama-quantize's --tensor-type-file) instead of
    /// measuring them.
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// gguf:auto: calibration chunks the per-tensor costs are measured on (the first ones)
    /// [default: 4].
    #[arg(long, value_name = "N")]
    auto_probe: Option<usize>,
    /// gguf:auto: calibration chunks held back (the last ones) to check the result and the
    /// uniform mixes against bf16 [default: 4].
    #[arg(long, value_name = "N")]
    auto_holdout: Option<usize>,
    /// gguf:auto: rows of each tensor quantized to estimate each type's error [default: 512].
    #[arg(long, value_name = "N")]
    auto_rows: Option<usize>,
    /// gguf:auto: uniform mixes scored beside the result on the held-back chunks: `nearby`
    /// (the nearest smaller and larger), `none`, or a comma-separated list (q4_k_m,q4_0)
    /// [default: nearby].
    #[arg(long, value_name = "MIXES")]
    compare: Option<String>,
    #[command(flatten)]
    calib: CalibArgs,
    /// Worker threads (default: all logical CPUs; the output bytes do not depend on it).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show what a checkpoint folder holds.
    Inspect {
        /// Checkpoint folder (config.json and safetensors weights).
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
        /// Geometry: tiny (the bundled fixture's) or minitron-4b-depth (Llama-3.1-Minitron-4B-Depth's).
        #[arg(long, value_parser = ["tiny", "minitron-4b-depth"])]
        preset: String,
        /// Seed of the random weights (the same seed gives the same bytes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output checkpoint folder.
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
        /// GGUF file (a model or an importance matrix).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print long arrays whole instead of their first values.
        #[arg(long)]
        full: bool,
    },
    /// List every CUDA kernel name the GPU runner can request, `module name` per line (for
    /// scripts/build-cuda.sh's preflight).
    #[command(hide = true)]
    CudaKernels,
}

/// `--to` values as given, listed in `--help`; each is parsed by the library's own `FromStr`
/// (whose message names every target) when the command runs.
#[derive(Clone)]
struct TargetNames;

impl clap::builder::TypedValueParser for TargetNames {
    type Value = String;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        Ok(value.to_string_lossy().into_owned())
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            Target::ALL
                .iter()
                .map(|t| clap::builder::PossibleValue::new(t.name()))
                .chain([clap::builder::PossibleValue::new(AUTO)]),
        ))
    }
}

/// The folder `path` is written into (spilled hidden states go there: the disk the user chose
/// for the output, not a temporary folder that may live in memory).
fn folder_of(path: &std::path::Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Calibration options shared by every command that calibrates.
#[derive(clap::Args, Debug)]
struct CalibArgs {
    /// Calibration text: plain text, or JSONL with a `text` field per line (default: built-in corpus).
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Number of chunks (the first N consecutive chunks of the text unless --calib-shuffle)
    /// [default: 64].
    #[arg(long, value_name = "N")]
    calib_samples: Option<usize>,
    /// Tokens per chunk [default: 512].
    #[arg(long, value_name = "N")]
    calib_seq: Option<usize>,
    /// Draw the chunks at random (without replacement) with this seed.
    #[arg(long, value_name = "SEED")]
    calib_shuffle: Option<u64>,
    /// Save the calibration statistics (safetensors) for reuse.
    #[arg(long, value_name = "FILE")]
    save_calib: Option<PathBuf>,
    /// Reuse statistics saved by --save-calib instead of running the model.
    #[arg(long, value_name = "FILE", conflicts_with = "calib")]
    load_calib: Option<PathBuf>,
    /// Memory for the calibration chunks' hidden states, in MiB (samples × tokens × hidden ×
    /// 4 bytes); beyond it they are kept in a temporary file beside the output instead (unlinked
    /// at once, so nothing is left behind), read and written a group of chunks at a time
    /// [default: 2048].
    #[arg(long, value_name = "MIB")]
    calib_hidden_mib: Option<u64>,
}

impl CalibArgs {
    /// The options, spilling hidden states (past the budget) into folder `spill_dir`.
    fn options(&self, spill_dir: PathBuf) -> minitron::calib::CalibOptions {
        minitron::calib::CalibOptions {
            hidden_budget_bytes: self.calib_hidden_mib.unwrap_or(2048) << 20,
            spill_dir,
            calib: self.calib.clone(),
            spec: minitron::calib::CalibSpec {
                samples: self.calib_samples.unwrap_or(64),
                seq_len: self.calib_seq.unwrap_or(512),
                shuffle: self.calib_shuffle,
            },
            load: self.load_calib.clone(),
            save: self.save_calib.clone(),
        }
    }

    /// The first calibration option given, as spelled on the command line.
    fn first_given(&self) -> Option<&'static str> {
        [
            ("--calib", self.calib.is_some()),
            ("--calib-samples", self.calib_samples.is_some()),
            ("--calib-seq", self.calib_seq.is_some()),
            ("--calib-shuffle", self.calib_shuffle.is_some()),
            ("--save-calib", self.save_calib.is_some()),
            ("--load-calib", self.load_calib.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        .map(|(n, _)| n)
    }

    /// Whether any calibration option was given.
    fn asked(&self) -> bool {
        self.calib.is_some()
            || self.calib_samples.is_some()
            || self.calib_seq.is_some()
            || self.calib_shuffle.is_some()
            || self.save_calib.is_some()
            || self.load_calib.is_some()
    }
}

fn main() -> std::process::ExitCode {
    common::exit_on_error(|| {
        let cli = Cli::parse();
        common::set_threads(cli.threads);
        match cli.cmd {
            Some(Cmd::Inspect { dir, verbose, json }) => {
                let ck = minitron::scheme::open(&dir)?;
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
                let opts = calib.options(folder_of(&out));
                let stats = minitron::calib::calibrate(&ck, &opts, &candle_core::Device::Cpu)?;
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
            Some(Cmd::CudaKernels) => {
                for (module, name) in minitron::runtime::devform::requested_kernels() {
                    println!("{module} {name}");
                }
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
                let pb = minitron::progress::bar(0, "synth", minitron::progress::Unit::Bytes);
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
            None => convert(&cli),
        }
    })
}

/// Refuses an option that none of `targets` uses, naming the targets it belongs to: an option
/// that is accepted and then ignored looks like it had an effect.
fn check_applicable(cli: &Cli, targets: &[Target]) -> anyhow::Result<()> {
    let names = || {
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",")
    };
    let any = |f: fn(Target) -> bool| targets.iter().any(|&t| f(t));
    let quantized_gguf = |t: Target| t.mix().is_some_and(|m| !m.is_float());
    let rules: [(&str, bool, bool, &str); 11] = [
        (
            "--fp8-weights",
            cli.fp8_weights.is_some(),
            any(Target::is_fp8),
            "the FP8 targets (fp8, fp8-static, fp8-modelopt)",
        ),
        (
            "--int8-weights",
            cli.int8_weights.is_some(),
            any(|t| t == Target::Int8),
            "--to int8",
        ),
        (
            "--smooth-alpha",
            cli.smooth_alpha.is_some(),
            any(|t| t == Target::Int8),
            "--to int8",
        ),
        (
            "--group-size",
            cli.group_size.is_some(),
            any(|t| t.packed_bits().is_some()),
            "--to int8-w8a16 and w4a16",
        ),
        (
            "--int4-weights",
            cli.int4_weights.is_some(),
            any(|t| t == Target::W4A16),
            "--to w4a16",
        ),
        (
            "--imatrix",
            cli.imatrix.is_some(),
            any(quantized_gguf),
            "quantized GGUF targets (gguf:q8_0 … gguf:q3_k_m)",
        ),
        (
            "--gguf-search",
            cli.gguf_search.is_some(),
            any(quantized_gguf),
            "quantized GGUF targets (gguf:q8_0 … gguf:q3_k_m)",
        ),
        (
            "--tensor-type",
            !cli.tensor_type.is_empty(),
            any(|t| t.mix().is_some()),
            "GGUF targets (gguf:TYPE)",
        ),
        (
            "--output-type",
            cli.output_type.is_some(),
            any(|t| t.mix().is_some()),
            "GGUF targets (gguf:TYPE)",
        ),
        (
            "--embedding-type",
            cli.embedding_type.is_some(),
            any(|t| t.mix().is_some()),
            "GGUF targets (gguf:TYPE)",
        ),
        (
            "--gguf-pre",
            cli.gguf_pre.is_some(),
            any(|t| t.mix().is_some()),
            "GGUF targets (gguf:TYPE)",
        ),
    ];
    for (opt, given, applies, owner) in rules {
        if given && !applies {
            bail!(
                "{opt} applies to {owner}, not to --to {}: drop it or add such a target",
                names()
            );
        }
    }
    Ok(())
}

/// The `--to` name of the measured GGUF mix.
const AUTO: &str = "gguf:auto";
/// The `--to` name of the measured compressed-tensors mix.
const W4A16_AUTO: &str = "w4a16:auto";

/// `MODEL --to gguf:auto|w4a16:auto --bpw X|--size B|--recipe F --out PATH`.
fn convert_auto(cli: &Cli) -> anyhow::Result<()> {
    use minitron::automix::{AutoOptions, Budget, Compare};
    let started = std::time::Instant::now();
    let packed = cli
        .to
        .iter()
        .any(|t| t.trim().eq_ignore_ascii_case(W4A16_AUTO));
    let (name, what) = if packed {
        (W4A16_AUTO, "DIR")
    } else {
        (AUTO, "FILE.gguf")
    };
    let Some(model) = cli.model.clone() else {
        bail!("give a MODEL folder with --to {name} --out {what}");
    };
    if cli.to.len() != 1 {
        bail!("--to {name} makes one artifact: give it alone");
    }
    let Some(out) = cli.out.clone() else {
        bail!("--out {what} is required");
    };
    let budget = match (cli.bpw, cli.size, &cli.recipe) {
        (Some(b), _, _) => {
            if !(b.is_finite() && b > 0.0) {
                bail!("--bpw must be a positive number of bits, found {b}");
            }
            Some(Budget::Bpw(b))
        }
        (_, Some(s), _) => Some(Budget::Size(s)),
        (_, _, Some(_)) => None,
        _ => bail!("--to {name} needs a budget: --bpw BITS or --size BYTES (or --recipe FILE)"),
    };
    let foreign = [
        ("--fp8-weights", cli.fp8_weights.is_some()),
        ("--int8-weights", cli.int8_weights.is_some()),
        ("--int4-weights", cli.int4_weights.is_some() && !packed),
        ("--smooth-alpha", cli.smooth_alpha.is_some()),
        ("--group-size", cli.group_size.is_some()),
        ("--calib-inputs", cli.calib_inputs.is_some()),
        ("--imatrix", cli.imatrix.is_some()),
        ("--tensor-type", !cli.tensor_type.is_empty()),
        ("--output-type", cli.output_type.is_some()),
        ("--embedding-type", cli.embedding_type.is_some()),
        ("--resume", cli.resume),
        ("--load-calib", cli.calib.load_calib.is_some()),
        ("--save-calib", cli.calib.save_calib.is_some()),
    ];
    if let Some((opt, _)) = foreign.iter().find(|(_, g)| *g) {
        bail!("{opt} does not apply to --to {name} (it chooses every layer's type and calibrates on its own chunks)");
    }
    let compare = match cli.compare.as_deref().unwrap_or("nearby") {
        "nearby" => Compare::Nearby,
        "none" => Compare::None,
        list if packed => Compare::Kinds(
            list.split(',')
                .map(|m| minitron::scheme::LayerQuant::parse(m.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--compare: {e}"))?,
        ),
        list => Compare::Mixes(
            list.split(',')
                .map(|m| minitron::quant::recipe::Mix::parse(m.trim()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let int4 = match cli.int4_weights.as_deref() {
        None | Some("gptq") => minitron::quant::int8::Int4Method::Gptq,
        Some("rtn") => minitron::quant::int8::Int4Method::Rtn,
        Some(m) => bail!("--int4-weights {m}: w4a16:auto takes gptq or rtn"),
    };
    let opts = ExportOptions {
        targets: vec![],
        out: out.clone(),
        force: cli.force,
        fp8_weights: WeightMode::Rtn,
        int8_weights: WeightMode::Rtn,
        int4_weights: int4,
        smooth_alpha: None,
        group_size: None,
        calib: cli.calib.options(folder_of(&out)),
        calib_asked: false,
        gguf: GgufSettings {
            overrides: vec![],
            output_type: None,
            embedding_type: None,
            imatrix: None,
            pre: cli.gguf_pre.clone(),
            search: cli.gguf_search.unwrap_or(KSearch::Reference),
            tensor_types: Default::default(),
        },
        command_line: common::command_line(),
        allow_nonfinite: cli.allow_nonfinite,
        calib_inputs: None,
        resume: false,
        journal_every_s: cli.journal_every,
        layer_quant: Default::default(),
    };
    let a = AutoOptions {
        budget,
        recipe: cli.recipe.clone(),
        probe: cli.auto_probe.unwrap_or(4),
        holdout: cli.auto_holdout.unwrap_or(4),
        sample_rows: cli.auto_rows.unwrap_or(512),
        compare,
        export: opts,
    };
    let ck = Checkpoint::open(&model)?;
    if packed {
        let r = minitron::automix::packed::run(&ck, &a, &candle_core::Device::Cpu, &|m| {
            minitron::progress::note(m)
        })?;
        println!("{}", minitron::automix::packed::report_table(&r));
        let mix: Vec<String> = r.kinds.iter().map(|(t, n)| format!("{n} {t}")).collect();
        println!(
            "wrote {} ({} of tensors, {:.3} bits per linear weight: {}); recipe {}; choice {:.1} s, writing {:.1} s, check {:.1} s, {:.1} s in all",
            r.path.display(),
            minitron::inspect::human_bytes(r.bytes),
            r.bpw,
            mix.join(", "),
            r.recipe_file.display(),
            r.choice_s,
            r.write_s,
            r.check_s,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let r = minitron::automix::run(&ck, &a, &candle_core::Device::Cpu, &|m| {
        minitron::progress::note(m)
    })?;
    println!("{}", minitron::automix::report_table(&r));
    let mix: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}, {:.3} bits per weight: {}); recipe {}, importance matrix {}; choice {:.1} s, writing {:.1} s, check {:.1} s, {:.1} s in all",
        r.path.display(),
        minitron::inspect::human_bytes(r.bytes),
        r.bpw,
        mix.join(", "),
        r.recipe_file.display(),
        r.imatrix_file.display(),
        r.choice_s,
        r.write_s,
        r.check_s,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `MODEL --to TARGETS --out PATH`: parse, run the export, print what it did.
fn convert(cli: &Cli) -> anyhow::Result<()> {
    let auto_given = cli.bpw.is_some()
        || cli.size.is_some()
        || cli.recipe.is_some()
        || cli.auto_probe.is_some()
        || cli.auto_holdout.is_some()
        || cli.auto_rows.is_some()
        || cli.compare.is_some();
    let is_auto = cli
        .to
        .iter()
        .any(|t| t.trim().eq_ignore_ascii_case(AUTO) || t.trim().eq_ignore_ascii_case(W4A16_AUTO));
    if is_auto {
        return convert_auto(cli);
    }
    if auto_given {
        bail!("--bpw, --size, --recipe, --auto-* and --compare apply to --to gguf:auto and w4a16:auto only");
    }
    let started = std::time::Instant::now();
    let Some(model) = cli.model.clone() else {
        bail!("give a MODEL folder with --to TARGET --out PATH, or a subcommand (see --help)");
    };
    if cli.to.is_empty() {
        bail!("--to TARGET is required (see --help for the list)");
    }
    let Some(out) = cli.out.clone() else {
        bail!("--out PATH is required");
    };
    let out_path = out.clone();
    let targets = Target::parse_list(&cli.to.join(","))?;
    check_applicable(cli, &targets)?;
    let overrides = cli
        .tensor_type
        .iter()
        .map(|o| {
            let (re, t) = o.rsplit_once('=').ok_or_else(|| {
                anyhow::anyhow!("--tensor-type: expected REGEX=TYPE, found `{o}`")
            })?;
            Ok((
                re.to_string(),
                t.parse::<GgmlType>().map_err(anyhow::Error::msg)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let smooth_alpha = match cli.smooth_alpha.as_deref().unwrap_or("0.8") {
        "auto" => None,
        a => {
            let v: f64 = a.parse().map_err(|_| {
                anyhow::anyhow!("--smooth-alpha: expected a number or auto, found `{a}`")
            })?;
            if !(v > 0.0 && v < 1.0) {
                bail!("--smooth-alpha must be in (0, 1), found {v}");
            }
            Some(v)
        }
    };
    let opts = ExportOptions {
        targets,
        out,
        force: cli.force,
        fp8_weights: cli.fp8_weights.unwrap_or(WeightMode::Rtn),
        int8_weights: match cli.int8_weights.as_deref() {
            Some("gptq") => WeightMode::Gptq,
            _ => WeightMode::Rtn,
        },
        int4_weights: match cli.int4_weights.as_deref() {
            Some("gptq") => minitron::quant::int8::Int4Method::Gptq,
            Some("awq") => minitron::quant::int8::Int4Method::Awq,
            _ => minitron::quant::int8::Int4Method::Rtn,
        },
        smooth_alpha,
        group_size: cli.group_size,
        calib: cli.calib.options(folder_of(&out_path)),
        calib_asked: cli.calib.asked(),
        gguf: GgufSettings {
            overrides,
            output_type: cli.output_type,
            embedding_type: cli.embedding_type,
            imatrix: cli.imatrix.clone(),
            pre: cli.gguf_pre.clone(),
            search: cli.gguf_search.unwrap_or(KSearch::Reference),
            tensor_types: Default::default(),
        },
        command_line: common::command_line(),
        allow_nonfinite: cli.allow_nonfinite,
        calib_inputs: match cli.calib_inputs.as_deref() {
            Some("quantized") => Some(minitron::calib::CalibInputs::Quantized),
            Some(_) => Some(minitron::calib::CalibInputs::Original),
            None => None,
        },
        resume: cli.resume,
        journal_every_s: cli.journal_every,
        layer_quant: Default::default(),
    };
    if opts.calib_asked && opts.calibrated_targets().is_empty() {
        bail!(
            "{} applies to targets that calibrate (int8, fp8-static, FP8 with --fp8-weights search|gptq, w4a16 with --int4-weights gptq|awq, quantized GGUF types), not to --to {}: drop it or add such a target",
            cli.calib.first_given().unwrap_or("--calib"),
            opts.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
        );
    }
    let ck = Checkpoint::open(&model)?;
    if let Some(first) = ck.unexpected.first() {
        minitron::progress::warn(&format!(
            "{} tensor(s) in {} are not part of the model config.json describes (first: `{first}`); they are not converted",
            ck.unexpected.len(),
            model.display()
        ));
    }
    // Made at the first conversion step, so that the calibration bar (if any) is alone on
    // screen while it runs.
    let pb: std::cell::OnceCell<indicatif::ProgressBar> = std::cell::OnceCell::new();
    let r = minitron::export::run(&ck, &opts, &candle_core::Device::Cpu, &|d, t| {
        let b = pb
            .get_or_init(|| minitron::progress::bar(t, "convert", minitron::progress::Unit::Bytes));
        b.set_position(d);
    })?;
    if let Some(b) = pb.get() {
        b.finish_and_clear();
    }
    if let Some(i) = &r.calibration {
        let used: Vec<&str> = r.calibrated.iter().map(|t| t.name()).collect();
        println!(
            "calibrated once: {} chunks × {} tokens of {} (sha256 {}…), {} forward pass{}, {:.1} s, block by block on {} inputs; used by {}",
            i.samples,
            i.seq_len,
            i.source,
            &i.sha256[..12.min(i.sha256.len())],
            r.calibration_passes,
            if r.calibration_passes == 1 { "" } else { "es" },
            i.wall_s,
            r.calib_inputs.map_or("original", |c| c.name()),
            if used.is_empty() { "-".to_string() } else { used.join(", ") }
        );
    }
    for (t, a) in &r.artifacts {
        match a {
            Artifact::Checkpoint { path, manifest: m } => {
                let worst = m.tensor_error.worst.as_ref();
                // The manifest lists every file but itself.
                println!(
                    "wrote {} ({}, {} in {} files); worst tensor error {:.4} % relative RMS ({})",
                    path.display(),
                    t,
                    minitron::inspect::human_bytes(m.total_bytes),
                    m.files.len() + 1,
                    100.0 * worst.map_or(0.0, |w| w.relative_rms),
                    worst.map_or("-", |w| w.tensor.as_str())
                );
            }
            Artifact::Gguf(g) => {
                let mut counts = std::collections::BTreeMap::new();
                for (_, ty) in &g.tensors {
                    *counts.entry(ty.name()).or_insert(0usize) += 1;
                }
                let mix: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
                println!(
                    "wrote {} ({}, {}, {} tensors: {})",
                    g.path.display(),
                    t,
                    minitron::inspect::human_bytes(g.bytes),
                    g.tensors.len(),
                    mix.join(", ")
                );
            }
        }
    }
    let calib_s = r.calibration.as_ref().map_or(0.0, |i| i.wall_s);
    let parts = if r.calibration_passes > 0 {
        format!(
            " (calibration {:.1} s, conversion and writing {:.1} s)",
            calib_s,
            (r.wall_s - calib_s).max(0.0)
        )
    } else {
        String::new()
    };
    println!(
        "read {} once: {} tensors, {}; {} artifact{} in {:.1} s{}",
        model.display(),
        r.tensors_read,
        minitron::inspect::human_bytes(r.bytes_read),
        r.artifacts.len(),
        if r.artifacts.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        parts
    );
    Ok(())
}
