//! Bytes against KL-divergence for llama-quantize's uniform mixes and for `gguf:auto` at
//! several budgets, on SmolLM2-135M (the real assets), drawn to `benches/auto_mix.png`.
//!
//! One calibration (built-in corpus, 64 × 512 tokens): the last 4 chunks are held back, the
//! importance matrix comes from the other 60, the per-tensor costs are measured once on the
//! first 4; every file (uniform mixes with that importance matrix, and `auto` at the sizes of
//! q3_k_m, q4_0, q4_k_m and q5_k_m) is scored against bf16 on `MINITRON_AUTO_EVAL`
//! (default: the held-back chunks; a text file: its first 16 chunks of 512).
//!
//! `cargo bench --bench auto_mix` (about 20 minutes on 2 cores).

use std::collections::BTreeMap;
use std::path::PathBuf;

use minitron::automix::{self, sensitivity, Budget, Layout};
use minitron::export::{ExportOptions, GgufSettings, Target};
use minitron::model::Checkpoint;
use minitron::quant::recipe::Mix;

fn main() -> minitron::Result<()> {
    let assets = std::env::var_os("MINITRON_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/minitron-assets")
        });
    let model = assets.join("smollm2-135m");
    if !model.join("config.json").exists() {
        println!(
            "auto_mix: NOT RUN: needs SmolLM2-135M at {} (../shared/tools/real-assets.sh)",
            model.display()
        );
        return Ok(());
    }
    let cpu = candle_core::Device::Cpu;
    let ck = Checkpoint::open(&model)?;
    let dir = tempfile::tempdir().map_err(|e| minitron::Error::Internal(e.to_string()))?;
    let o = ExportOptions {
        targets: vec![],
        out: dir.path().join("x.gguf"),
        force: true,
        fp8_weights: minitron::quant::fp8::WeightMode::Rtn,
        int8_weights: minitron::quant::fp8::WeightMode::Rtn,
        int4_weights: minitron::quant::int8::Int4Method::Rtn,
        smooth_alpha: None,
        group_size: None,
        calib: minitron::calib::CalibOptions {
            calib: None,
            spec: minitron::calib::CalibSpec {
                samples: 64,
                seq_len: 512,
                shuffle: None,
            },
            load: None,
            save: None,
            hidden_budget_bytes: 2 << 30,
            spill_dir: dir.path().to_owned(),
        },
        calib_asked: false,
        gguf: GgufSettings {
            overrides: vec![],
            output_type: None,
            embedding_type: None,
            imatrix: None,
            pre: None,
            search: Default::default(),
            tensor_types: BTreeMap::new(),
        },
        command_line: "cargo bench --bench auto_mix".into(),
        allow_nonfinite: false,
        calib_inputs: None,
        resume: false,
        journal_every_s: 60,
        layer_quant: Default::default(),
    };
    let tok = minitron::model::Tokenizer::load(&ck.dir)?;
    let text = minitron::calib::dataset::load_source(None)?;
    let chunks = minitron::calib::dataset::calibration_chunks(&tok, &text, &o.calib.spec)?;
    let (choice, held) = chunks.split_at(chunks.len() - 4);
    let eval: Vec<Vec<u32>> = match std::env::var_os("MINITRON_AUTO_EVAL") {
        Some(p) => {
            let t = std::fs::read_to_string(&p)
                .map_err(|e| minitron::Error::Internal(e.to_string()))?;
            let ids = tok.encode(&t, true)?;
            let plan = minitron::calib::dataset::ChunkPlan {
                ctx: 512,
                max_chunks: Some(16),
                bos: if tok.adds_bos { tok.bos_id } else { None },
            };
            plan.chunks(&ids)?
        }
        None => held.to_vec(),
    };
    let t0 = std::time::Instant::now();
    let m = sensitivity::measure(
        &ck,
        &sensitivity::ProbeOptions {
            chunks: choice,
            probe: 4,
            first: 256,
            sample_rows: 512,
            search: Default::default(),
        },
        &cpu,
        &|_, _| (),
    )?;
    println!("sensitivity pass: {:.1} s", t0.elapsed().as_secs_f64());
    let imatrix = dir.path().join("choice.imatrix");
    m.imatrix.write_gguf(&imatrix)?;
    let lay = Layout::of(&ck, &o)?;

    // The uniform mixes, in one pass.
    let mixes = [
        Mix::Q3KM,
        Mix::Q4_0,
        Mix::Q4KM,
        Mix::Q5KM,
        Mix::Q6K,
        Mix::Q8_0,
    ];
    let mut uo = o.clone();
    uo.targets = mixes.iter().map(|&m| Target::Gguf(m)).collect();
    uo.out = dir.path().join("uniform");
    uo.gguf.imatrix = Some(imatrix.clone());
    let r = minitron::export::run(&ck, &uo, &cpu, &|_, _| ())?;
    let mut rows = Vec::new();
    let mut sizes = BTreeMap::new();
    for (t, a) in &r.artifacts {
        if let minitron::export::Artifact::Gguf(g) = a {
            let s = automix::score(
                &ck,
                &g.path,
                &eval,
                256,
                &cpu,
                t.name(),
                None,
                lay.params,
                lay.header,
            )?;
            sizes.insert(t.name().to_string(), g.bytes);
            println!(
                "{:<14} {:>11} B {:.3} bpw  KLD {:.6}",
                s.name, s.bytes, s.bpw, s.divergence.mean_kld
            );
            rows.push(s);
            std::fs::remove_file(&g.path).ok();
        }
    }
    let mut auto_rows = Vec::new();
    for at in [Mix::Q3KM, Mix::Q4_0, Mix::Q4KM, Mix::Q5KM] {
        let budget = sizes[at.target_name()];
        let types = lay.choose(&m, Budget::Size(budget))?;
        let path = dir.path().join(format!("auto-{}.gguf", at.name()));
        automix::write_gguf(&ck, &o, at, &types, &imatrix, &path, &cpu)?;
        let name = format!("auto@{}", at.name());
        let s = automix::score(
            &ck,
            &path,
            &eval,
            256,
            &cpu,
            &name,
            Some(automix::predicted_kld(&m, &types)),
            lay.params,
            lay.header,
        )?;
        println!(
            "{:<14} {:>11} B {:.3} bpw  KLD {:.6}",
            s.name, s.bytes, s.bpw, s.divergence.mean_kld
        );
        auto_rows.push(s);
        std::fs::remove_file(&path).ok();
    }
    let eval_name = if std::env::var_os("MINITRON_AUTO_EVAL").is_some() {
        "16 x 512 of MINITRON_AUTO_EVAL"
    } else {
        "4 held-back x 512"
    };
    let plot = minitron::plot::Plot {
        title: format!("SmolLM2-135M GGUF: size vs KLD against bf16 ({eval_name})"),
        x_label: "bits per weight".into(),
        y_label: "mean KLD".into(),
        log_y: true,
        series: vec![
            minitron::plot::Series {
                label: "llama-quantize mixes".into(),
                color: [40, 90, 200],
                lines: true,
                points: rows
                    .iter()
                    .map(|s| {
                        (
                            s.bpw,
                            s.divergence.mean_kld,
                            s.name.trim_start_matches("gguf:").to_string(),
                        )
                    })
                    .collect(),
            },
            minitron::plot::Series {
                label: "gguf:auto".into(),
                color: [210, 60, 30],
                lines: true,
                points: auto_rows
                    .iter()
                    .map(|s| (s.bpw, s.divergence.mean_kld, String::new()))
                    .collect(),
            },
        ],
    };
    let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/auto_mix.png");
    plot.write(&png, 800, 500)?;
    println!("wrote {}", png.display());
    Ok(())
}
