//! Deterministic random-weight Llama-3.x checkpoints (formats/hf-llama.md#synthetic).
//!
//! Same preset and seed → the same bytes, for any thread count: each tensor is generated in
//! fixed-size chunks, and each chunk draws from its own SplitMix64 stream keyed by
//! (seed, tensor index, chunk index). Tensors are streamed to disk a batch of chunks at a time,
//! so memory stays bounded even for the 4.5 B-parameter preset.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::names::{expected_tensors, TensorSpec};
use crate::numerics::convert::f32_to_bf16_bytes;
use crate::numerics::rng::SplitMix64;

/// Hugging Face's default shard limit (`max_shard_size="5GB"`, decimal).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;
const CHUNK_ELEMS: usize = 1 << 18;
const BATCH_CHUNKS: usize = 64;

/// A named geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The committed test fixture: hidden 128, 2 layers, 4 heads / 2 KV heads, vocab 512.
    Tiny,
    /// Exactly Llama-3.1-Minitron-4B-Depth-Base's geometry (16 blocks, GQA 32/8, untied head).
    Minitron4bDepth,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "minitron-4b-depth" => Ok(Preset::Minitron4bDepth),
            _ => Err(Error::Invalid(format!(
                "unknown preset `{s}` (expected tiny or minitron-4b-depth)"
            ))),
        }
    }

    /// config.json contents as transformers writes them for a Llama model.
    pub fn config_json(self) -> Value {
        let (hidden, inter, layers, heads, kv, vocab, max_pos) = match self {
            Preset::Tiny => (128, 384, 2, 4, 2, 512, 2048),
            Preset::Minitron4bDepth => (4096, 14336, 16, 32, 8, 128256, 131072),
        };
        let (bos, eos) = self.special_ids();
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "head_dim": hidden / heads,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": inter,
            "max_position_embeddings": max_pos,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "vocab_size": vocab
        })
    }

    /// Number of special tokens at the top of the id space, Llama-3 style.
    fn n_special(self) -> usize {
        match self {
            Preset::Tiny => 8,
            Preset::Minitron4bDepth => 256,
        }
    }

    /// Ids of `<|begin_of_text|>` and `<|end_of_text|>`.
    fn special_ids(self) -> (u32, u32) {
        let vocab = self.config_json_vocab();
        let first = (vocab - self.n_special()) as u32;
        (first, first + 1)
    }

    fn config_json_vocab(self) -> usize {
        match self {
            Preset::Tiny => 512,
            Preset::Minitron4bDepth => 128256,
        }
    }

    /// Size of the learned byte-level BPE vocabulary (bytes + merges).
    fn bpe_vocab(self) -> usize {
        match self {
            Preset::Tiny => 512 - 8,
            Preset::Minitron4bDepth => 2048,
        }
    }
}

/// What `synth` wrote.
pub struct SynthSummary {
    pub files: Vec<PathBuf>,
    pub total_bytes: u64,
    pub parameters: u64,
}

/// Writes a complete checkpoint folder for `preset` into `out`.
///
/// The folder is assembled under a sibling temporary name and renamed into place at the end, so
/// an interrupted run never leaves a folder that looks complete. `out` must not exist unless
/// `force` is set, in which case it is replaced only after the new one is finished.
pub fn write_checkpoint(
    preset: Preset,
    seed: u64,
    out: &Path,
    force: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<SynthSummary> {
    write_checkpoint_with(preset, seed, out, force, None, progress)
}

/// As [`write_checkpoint`], with the tokenizer (tokenizer.json and tokenizer_config.json)
/// copied from `tokenizer_dir` instead of the built-in one. Its vocabulary must fit the
/// preset's embedding rows.
pub fn write_checkpoint_with(
    preset: Preset,
    seed: u64,
    out: &Path,
    force: bool,
    tokenizer_dir: Option<&Path>,
    progress: &dyn Fn(u64, u64),
) -> Result<SynthSummary> {
    if let Some(td) = tokenizer_dir {
        let tok = crate::model::Tokenizer::load(td)?;
        let rows =
            LlamaConfig::from_json_str(&preset.config_json().to_string(), Path::new("<preset>"))
                .expect("presets are valid configs")
                .vocab_size;
        if tok.vocab_size() > rows {
            return Err(crate::error::Error::Invalid(format!(
                "{}: {} tokens do not fit the preset's {rows} embedding rows",
                td.join("tokenizer.json").display(),
                tok.vocab_size()
            )));
        }
    }
    let summary = crate::format::safetensors::build_dir(out, force, |tmp| {
        let s = write_into(preset, seed, tmp, progress)?;
        if let Some(td) = tokenizer_dir {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                let src = td.join(f);
                if src.exists() {
                    std::fs::copy(&src, tmp.join(f))
                        .map_err(|e| crate::error::Error::io(&src, e))?;
                }
            }
        }
        Ok(s)
    })?;
    Ok(SynthSummary {
        files: summary
            .files
            .iter()
            .map(|f| out.join(f.file_name().unwrap_or_default()))
            .collect(),
        ..summary
    })
}

fn write_into(
    preset: Preset,
    seed: u64,
    dir: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<SynthSummary> {
    let cfg_json = preset.config_json();
    let cfg = LlamaConfig::from_json_str(&cfg_json.to_string(), Path::new("<preset>"))
        .expect("presets are valid configs");
    write_json(&dir.join("config.json"), &cfg_json)?;
    let (bos, eos) = preset.special_ids();
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": eos, "do_sample": false}),
    )?;
    let tok = build_tokenizer(preset)?;
    write_json(&dir.join("tokenizer.json"), &tok)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "model_max_length": cfg.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": true
        }),
    )?;

    let specs = expected_tensors(&cfg);
    let shards = plan_shards(&specs);
    let total_bytes: u64 = specs.iter().map(bytes_of).sum();
    let parameters: u64 = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let n = shards.len();
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    for (si, shard) in shards.iter().enumerate() {
        let name = crate::format::safetensors::shard_name(si, n);
        let path = dir.join(&name);
        let mut members: Vec<(usize, &TensorSpec)> =
            shard.iter().map(|&i| (i, &specs[i])).collect();
        members.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        write_shard(&path, &members, seed, &mut |b| {
            done += b;
            progress(done, total_bytes)
        })?;
        for (_, s) in &members {
            weight_map.insert(s.name.clone(), name.clone());
        }
        files.push(path);
    }
    if n > 1 {
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}),
        )?;
    }
    Ok(SynthSummary {
        files,
        total_bytes,
        parameters,
    })
}

fn bytes_of(s: &TensorSpec) -> u64 {
    s.shape.iter().product::<usize>() as u64 * 2
}

/// Greedy in canonical order, as transformers' `save_pretrained` fills shards.
fn plan_shards(specs: &[TensorSpec]) -> Vec<Vec<usize>> {
    crate::format::safetensors::plan_shards(specs.iter().map(bytes_of), MAX_SHARD_BYTES)
}

fn write_shard(
    path: &Path,
    members: &[(usize, &TensorSpec)],
    seed: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for (_, s) in members {
        let b = bytes_of(s);
        header.insert(
            s.name.clone(),
            json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [off, off + b]}),
        );
        off += b;
    }
    let mut hbytes = serde_json::to_vec(&Value::Object(header)).expect("header serialises");
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 22, f);
    let io = |e| Error::io(path, e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    for &(ti, s) in members {
        let numel: usize = s.shape.iter().product();
        let kind = init_kind(s);
        let n_chunks = numel.div_ceil(CHUNK_ELEMS);
        for batch_start in (0..n_chunks).step_by(BATCH_CHUNKS) {
            let batch_end = (batch_start + BATCH_CHUNKS).min(n_chunks);
            let bytes: Vec<Vec<u8>> = (batch_start..batch_end)
                .into_par_iter()
                .map(|c| {
                    let len = CHUNK_ELEMS.min(numel - c * CHUNK_ELEMS);
                    let mut rng = SplitMix64::keyed(seed, ti as u64, c as u64);
                    let vals: Vec<f32> = (0..len).map(|_| kind.sample(&mut rng)).collect();
                    f32_to_bf16_bytes(&vals)
                })
                .collect();
            for b in bytes {
                w.write_all(&b).map_err(io)?;
                progress(b.len() as u64);
            }
        }
    }
    w.flush().map_err(io)?;
    w.into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}

/// How a tensor's values are drawn: norms near 1, matrices uniform with std 1/sqrt(fan_in), so
/// activations keep a unit scale through the random network.
#[derive(Clone, Copy)]
enum Init {
    Norm,
    Uniform { half_width: f32 },
}

fn init_kind(s: &TensorSpec) -> Init {
    if s.shape.len() == 1 {
        Init::Norm
    } else {
        let fan_in = s.shape[1] as f32;
        Init::Uniform {
            half_width: (3.0f32).sqrt() / fan_in.sqrt(),
        }
    }
}

impl Init {
    fn sample(self, rng: &mut SplitMix64) -> f32 {
        let u = rng.unit_f32() * 2.0 - 1.0;
        match self {
            Init::Norm => 1.0 + 0.1 * u,
            Init::Uniform { half_width } => half_width * u,
        }
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("json serialises");
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// GPT-2's reversible byte → printable-character table used by byte-level BPE.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid code point")
        };
    }
    table
}

/// The Llama-3 pre-tokenizer: its split pattern, then byte-level mapping.
fn llama3_pre_tokenizer() -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]
    })
}

/// A byte-level BPE with the Llama-3 pre-tokenizer, merges learned deterministically from the
/// built-in corpus, and Llama-3-style special tokens at the top of the id space.
fn build_tokenizer(preset: Preset) -> Result<Value> {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let pre: tokenizers::PreTokenizerWrapper =
        serde_json::from_value(llama3_pre_tokenizer()).expect("valid pre-tokenizer json");
    let mut pts = PreTokenizedString::from(crate::model::DEFAULT_CORPUS);
    pre.pre_tokenize(&mut pts)
        .map_err(|e| Error::Invalid(format!("pre-tokenizing the built-in corpus: {e}")))?;
    let mut words: BTreeMap<String, u64> = BTreeMap::new();
    for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Char) {
        *words.entry(w.to_owned()).or_default() += 1;
    }
    let table = byte_to_char_table();
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut seqs: Vec<(Vec<String>, u64)> = words
        .into_iter()
        .map(|(w, n)| (w.chars().map(|c| c.to_string()).collect(), n))
        .collect();
    while vocab.len() < preset.bpe_vocab() {
        let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (s, n) in &seqs {
            for p in s.windows(2) {
                *pairs.entry((&p[0], &p[1])).or_default() += n;
            }
        }
        // Highest count wins; ties go to the smallest pair, so the result is reproducible.
        let Some((best, count)) = pairs
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(p, n)| ((p.0.to_owned(), p.1.to_owned()), *n))
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let merged = format!("{}{}", best.0, best.1);
        for (s, _) in seqs.iter_mut() {
            let mut i = 0;
            let mut out = Vec::with_capacity(s.len());
            while i < s.len() {
                if i + 1 < s.len() && s[i] == best.0 && s[i + 1] == best.1 {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(std::mem::take(&mut s[i]));
                    i += 1;
                }
            }
            *s = out;
        }
        vocab.push(merged);
        merges.push(best);
    }
    // The tokenizers crate numbers added tokens from the end of the model's vocabulary, so the
    // vocabulary must reach exactly the first special id. Fill any gap with tokens that no merge
    // produces (never emitted by encoding).
    let mut filler = 0;
    while vocab.len() < (preset.config_json_vocab() - preset.n_special()) {
        vocab.push(format!("<|unused_{filler}|>"));
        filler += 1;
    }
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let (bos, _) = preset.special_ids();
    let added: Vec<Value> = (0..preset.n_special())
        .map(|k| {
            let content = match k {
                0 => "<|begin_of_text|>".to_owned(),
                1 => "<|end_of_text|>".to_owned(),
                k => format!("<|reserved_special_token_{}|>", k - 2),
            };
            json!({"id": bos as usize + k, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": llama3_pre_tokenizer(),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_preset_shards_like_transformers() {
        let cfg_json = Preset::Minitron4bDepth.config_json();
        let cfg = LlamaConfig::from_json_str(&cfg_json.to_string(), Path::new("x")).unwrap();
        let specs = expected_tensors(&cfg);
        let params: u64 = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(params, 4_540_469_248);
        let shards = plan_shards(&specs);
        assert_eq!(shards.len(), 2);
        for s in &shards {
            let b: u64 = s.iter().map(|&i| bytes_of(&specs[i])).sum();
            assert!(b <= MAX_SHARD_BYTES);
        }
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let set: std::collections::BTreeSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
