//! The runner against a straightforward f64 implementation written here from the published
//! Llama-3 equations, plus KV-cache consistency and self-comparison on the tiny fixture.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use minitron::model::{Checkpoint, Tokenizer};
use minitron::runtime::Llama;

struct Ref {
    ck: Checkpoint,
}

impl Ref {
    fn w(&self, name: &str) -> Vec<f64> {
        self.ck
            .read_f32(name)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// `y = x Wᵀ` for `x` `[t][in]`, `w` row-major `[out, in]`.
    fn linear(x: &[Vec<f64>], w: &[f64], out: usize) -> Vec<Vec<f64>> {
        let inp = x[0].len();
        x.iter()
            .map(|r| {
                (0..out)
                    .map(|o| (0..inp).map(|i| r[i] * w[o * inp + i]).sum())
                    .collect()
            })
            .collect()
    }

    fn rms_norm(x: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<Vec<f64>> {
        x.iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let k = 1.0 / (ms + eps).sqrt();
                r.iter().zip(w).map(|(v, g)| v * k * g).collect()
            })
            .collect()
    }

    /// Meta's `apply_scaling` for llama3 rope, written out again here.
    fn inv_freq(&self) -> Vec<f64> {
        let c = &self.ck.config_json;
        let d = self.ck.config.head_dim;
        let theta = c["rope_theta"].as_f64().unwrap();
        let s = &c["rope_scaling"];
        let (factor, lo, hi, old) = (
            s["factor"].as_f64().unwrap(),
            s["low_freq_factor"].as_f64().unwrap(),
            s["high_freq_factor"].as_f64().unwrap(),
            s["original_max_position_embeddings"].as_f64().unwrap(),
        );
        (0..d / 2)
            .map(|i| {
                let f = theta.powf(-((2 * i) as f64) / d as f64);
                let wl = 2.0 * std::f64::consts::PI / f;
                if wl < old / hi {
                    f
                } else if wl > old / lo {
                    f / factor
                } else {
                    let sm = (old / wl - lo) / (hi - lo);
                    (1.0 - sm) * f / factor + sm * f
                }
            })
            .collect()
    }

    fn rope(x: &mut [f64], pos: usize, inv: &[f64]) {
        let half = inv.len();
        for i in 0..half {
            let (s, c) = (pos as f64 * inv[i]).sin_cos();
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    }

    fn logits(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let cfg = &self.ck.config;
        let (hs, h, kv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let g = h / kv;
        let inv = self.inv_freq();
        let emb = self.w("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&i| emb[i as usize * hs..(i as usize + 1) * hs].to_vec())
            .collect();
        let t = ids.len();
        for l in 0..cfg.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let xn = Self::rms_norm(&x, &self.w(&p("input_layernorm.weight")), cfg.rms_norm_eps);
            let mut q = Self::linear(&xn, &self.w(&p("self_attn.q_proj.weight")), h * d);
            let mut k = Self::linear(&xn, &self.w(&p("self_attn.k_proj.weight")), kv * d);
            let v = Self::linear(&xn, &self.w(&p("self_attn.v_proj.weight")), kv * d);
            for pos in 0..t {
                for hh in 0..h {
                    Self::rope(&mut q[pos][hh * d..(hh + 1) * d], pos, &inv);
                }
                for hh in 0..kv {
                    Self::rope(&mut k[pos][hh * d..(hh + 1) * d], pos, &inv);
                }
            }
            let mut att = vec![vec![0f64; h * d]; t];
            for i in 0..t {
                for hh in 0..h {
                    let kh = hh / g;
                    let qi = &q[i][hh * d..(hh + 1) * d];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            qi.iter()
                                .zip(&k[j][kh * d..(kh + 1) * d])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for dd in 0..d {
                            att[i][hh * d + dd] += ej / z * v[j][kh * d + dd];
                        }
                    }
                }
            }
            let o = Self::linear(&att, &self.w(&p("self_attn.o_proj.weight")), hs);
            for (xr, or) in x.iter_mut().zip(&o) {
                for (a, b) in xr.iter_mut().zip(or) {
                    *a += b;
                }
            }
            let xn = Self::rms_norm(
                &x,
                &self.w(&p("post_attention_layernorm.weight")),
                cfg.rms_norm_eps,
            );
            let gate = Self::linear(
                &xn,
                &self.w(&p("mlp.gate_proj.weight")),
                cfg.intermediate_size,
            );
            let up = Self::linear(
                &xn,
                &self.w(&p("mlp.up_proj.weight")),
                cfg.intermediate_size,
            );
            let act: Vec<Vec<f64>> = gate
                .iter()
                .zip(&up)
                .map(|(gr, ur)| {
                    gr.iter()
                        .zip(ur)
                        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect()
                })
                .collect();
            let down = Self::linear(&act, &self.w(&p("mlp.down_proj.weight")), hs);
            for (xr, dr) in x.iter_mut().zip(&down) {
                for (a, b) in xr.iter_mut().zip(dr) {
                    *a += b;
                }
            }
        }
        let xn = Self::rms_norm(&x, &self.w("model.norm.weight"), cfg.rms_norm_eps);
        let head = if self.ck.index.contains_key("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        Self::linear(&xn, &self.w(head), cfg.vocab_size)
    }
}

fn tiny_ids(n: usize) -> Vec<u32> {
    let tok = Tokenizer::load(&tiny()).unwrap();
    let ids = tok.encode(minitron::calib::DEFAULT_CORPUS, true).unwrap();
    ids[..n].to_vec()
}

#[test]
fn runner_matches_an_f64_reference() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let ids = tiny_ids(40);
    let got = model.logits(&ids).unwrap();
    let want = Ref { ck }.logits(&ids);
    // f32 compute against f64: per-element rounding of ~6e-8 relative accumulates over dot
    // products of at most 384 terms and 2 blocks; 1e-4 absolute on logits of magnitude ~1–10 is
    // two orders above that and far below any real bug (a wrong rope pair or GQA map moves
    // logits by O(0.1)).
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    let scale = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 1.0,
        "logits too flat to test anything: max |logit| {scale}"
    );
    assert!(worst < 1e-4, "max |Δlogit| {worst} vs f64 reference");
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let ids = tiny_ids(24);
    let full = model.logits(&ids).unwrap();
    let mut cache = model.new_cache();
    let prefill = Tensor::from_slice(&ids[..10], (1, 10), &Device::Cpu).unwrap();
    let first = model
        .forward(&prefill, Some(&mut cache), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut rows = first;
    for &id in &ids[10..] {
        let t = Tensor::from_slice(&[id], (1, 1), &Device::Cpu).unwrap();
        let r = model
            .forward(&t, Some(&mut cache), None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        rows.extend(r);
    }
    assert_eq!(cache.len, ids.len());
    // Same arithmetic in a different grouping (one row vs many); 1e-4 covers f32 reassociation.
    for (i, (a, b)) in rows.iter().zip(&full).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "position {i}: {x} vs {y}");
        }
    }
    // Greedy through the cache picks what the full forward would.
    let g = model.greedy(&ids[..10], 3).unwrap();
    let mut seq = ids[..10].to_vec();
    for &tok in &g {
        let l = model.logits(&seq).unwrap();
        assert_eq!(tok, minitron::runtime::llama::argmax(l.last().unwrap()));
        seq.push(tok);
    }
}

#[test]
fn kld_of_a_model_against_itself_is_zero() {
    let text = root().join("src/calib/default_corpus.txt");
    let out = run_ok(
        "minitron-verify",
        &[
            s(&tiny()),
            "--reference",
            s(&tiny()),
            "--ppl",
            s(&text),
            "--ctx",
            "64",
            "--kld",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &r["kld"]["divergence"];
    assert!(d["mean_kld"].as_f64().unwrap() < 1e-6, "{d}");
    assert_eq!(d["top1_agreement_pct"].as_f64().unwrap(), 100.0);
    assert_eq!(r["kld"]["delta_ppl_pct"].as_f64().unwrap(), 0.0);
}

#[test]
fn fixture_is_regenerated_byte_for_byte() {
    // fixtures/tiny-llama3 was written by `minitron-convert synth --preset tiny --seed 0`; the
    // same command must give the same bytes, with any thread count.
    for threads in ["1", "2"] {
        let t = tempdir();
        let out = t.path().join("tiny");
        run_ok(
            "minitron-convert",
            &[
                "synth",
                "--preset",
                "tiny",
                "--seed",
                "0",
                "--out",
                s(&out),
                "--threads",
                threads,
            ],
        );
        for e in std::fs::read_dir(tiny()).unwrap() {
            let e = e.unwrap();
            assert_eq!(
                sha256(&e.path()),
                sha256(&out.join(e.file_name())),
                "{:?} differs",
                e.file_name()
            );
        }
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            std::fs::read_dir(tiny()).unwrap().count()
        );
    }
}

#[test]
fn another_seed_gives_other_weights_and_existing_output_is_kept() {
    let t = tempdir();
    let out = t.path().join("tiny");
    run_ok(
        "minitron-convert",
        &["synth", "--preset", "tiny", "--seed", "7", "--out", s(&out)],
    );
    assert_ne!(
        sha256(&out.join("model.safetensors")),
        sha256(&tiny().join("model.safetensors"))
    );
    assert_eq!(
        sha256(&out.join("tokenizer.json")),
        sha256(&tiny().join("tokenizer.json"))
    );
    let e = run_err(
        "minitron-convert",
        &["synth", "--preset", "tiny", "--out", s(&out)],
    );
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn inspect_reports_the_fixture() {
    let out = run_ok(
        "minitron-convert",
        &["inspect", s(&tiny()), "--json", "--verbose"],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["parameters"], 524_928);
    assert_eq!(r["layers"], 2);
    assert_eq!(r["kv_heads"], 2);
    assert_eq!(r["lm_head"], "untied");
    assert_eq!(r["rope"]["scaling"]["rope_type"], "llama3");
    assert_eq!(r["tensors"].as_array().unwrap().len(), 21);
    assert_eq!(r["tokenizer"]["adds_bos"], true);
}
