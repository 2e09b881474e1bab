//! An independent f64 implementation of the Llama-3 forward pass for tests.

use minitron::model::Checkpoint;

/// A plain f64 Llama forward pass, written from the equations, for checking the runner.
pub struct Ref {
    pub ck: Checkpoint,
}

/// Inputs of the linear layers and K (after RoPE) / V of one block, per position.
#[derive(Default)]
pub struct LayerCapture {
    pub attn_in: Vec<Vec<f64>>,
    pub attn_out: Vec<Vec<f64>>,
    pub mlp_in: Vec<Vec<f64>>,
    pub mlp_act: Vec<Vec<f64>>,
    pub k: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
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

    /// Logits of every position and each block's captured activations.
    pub fn run(&self, ids: &[u32]) -> (Vec<Vec<f64>>, Vec<LayerCapture>) {
        let mut caps = Vec::new();
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
            let mut cap = LayerCapture {
                attn_in: xn.clone(),
                attn_out: att.clone(),
                k: k.clone(),
                v: v.clone(),
                ..Default::default()
            };
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
            cap.mlp_in = xn.clone();
            cap.mlp_act = act.clone();
            caps.push(cap);
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
        (Self::linear(&xn, &self.w(head), cfg.vocab_size), caps)
    }
}
