//! The checkpoint's tokenizer (tokenizer.json through the `tokenizers` crate) and the optional
//! tokenizer_config.json / generation_config.json beside it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::format::gguf::keys;

/// A loaded tokenizer with the facts the runner and the verifier need.
pub struct Tokenizer {
    pub path: PathBuf,
    inner: tokenizers::Tokenizer,
    /// Whether encoding with special tokens puts BOS first (llama.cpp's `add_bos_token`).
    pub adds_bos: bool,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// tokenizer_config.json, when present.
    pub tokenizer_config: Option<Value>,
    /// generation_config.json, when present.
    pub generation_config: Option<Value>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the optional configs beside it.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(dir, "no tokenizer.json in this folder"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let read_opt = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let t = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))
        };
        let tokenizer_config = read_opt("tokenizer_config.json")?;
        let generation_config = read_opt("generation_config.json")?;

        let probe = inner.encode("a", true).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let plain = inner.encode("a", false).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let adds_bos = probe.get_ids().len() > plain.get_ids().len();
        let token_id = |v: Option<&Value>| -> Option<u32> {
            match v? {
                Value::String(s) => inner.token_to_id(s),
                Value::Object(o) => inner.token_to_id(o.get("content")?.as_str()?),
                _ => None,
            }
        };
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect(),
                _ => vec![],
            }
        };
        let gen = generation_config.as_ref();
        let tc = tokenizer_config.as_ref();
        let bos_id = if adds_bos {
            probe.get_ids().first().copied()
        } else {
            gen.and_then(|g| g.get("bos_token_id"))
                .and_then(Value::as_u64)
                .map(|n| n as u32)
                .or_else(|| token_id(tc.and_then(|t| t.get("bos_token"))))
        };
        let mut eos_ids = ids(gen.and_then(|g| g.get("eos_token_id")));
        if eos_ids.is_empty() {
            eos_ids.extend(token_id(tc.and_then(|t| t.get("eos_token"))));
        }
        Ok(Tokenizer {
            path,
            inner,
            adds_bos,
            bos_id,
            eos_ids,
            tokenizer_config,
            generation_config,
        })
    }

    /// The tokenizer a GGUF file describes (`tokenizer.ggml.*`), rebuilt by candle's GGUF
    /// tokenizer reader; BOS/EOS from the same keys.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        use candle_core::quantized::gguf_file;
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        // Our reader checks the whole layout (sizes, offsets, nesting) before candle's reads it.
        crate::format::gguf::GgufFile::open(path)?;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut ct = gguf_file::Content::read(&mut f)
            .map_err(|e| Error::format(path, crate::error::candle_message(&e)))?;
        // candle knows Llama-3's pre-tokenizer as `llama3`; llama.cpp names it `llama-bpe` and
        // implies BPE's ignore_merges for it.
        let pre = match ct.metadata.get(keys::TOKENIZER_PRE) {
            Some(gguf_file::Value::String(p)) => p.clone(),
            _ => String::new(),
        };
        if pre == "llama-bpe" {
            ct.metadata.insert(
                keys::TOKENIZER_PRE.into(),
                gguf_file::Value::String("llama3".into()),
            );
            ct.metadata
                .entry(keys::TOKENIZER_IGNORE_MERGES.into())
                .or_insert(gguf_file::Value::Bool(true));
        }
        let mut inner = tokenizers::Tokenizer::from_gguf(&ct).map_err(|e| Error::Tokenizer {
            path: path.to_owned(),
            msg: crate::error::candle_message(&e),
        })?;
        if pre == "smollm" {
            // SmolLM's pre-tokenizer: single digits, then GPT-2's byte-level split (candle has
            // no entry for it and would skip the digit split).
            use tokenizers::pre_tokenizers::{
                byte_level::ByteLevel, digits::Digits, sequence::Sequence,
            };
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        let num = |k: &str| -> Option<u32> {
            match ct.metadata.get(k)? {
                gguf_file::Value::U32(v) => Some(*v),
                gguf_file::Value::I32(v) => Some(*v as u32),
                gguf_file::Value::U64(v) => Some(*v as u32),
                _ => None,
            }
        };
        let adds_bos = matches!(
            ct.metadata.get(keys::TOKENIZER_ADD_BOS),
            Some(gguf_file::Value::Bool(true))
        );
        Ok(Tokenizer {
            path: path.to_owned(),
            inner,
            adds_bos,
            bos_id: num(keys::TOKENIZER_BOS_ID),
            eos_ids: num(keys::TOKENIZER_EOS_ID).into_iter().collect(),
            tokenizer_config: None,
            generation_config: None,
        })
    }

    /// Token ids of `text`; with `special`, BOS (and any other template tokens) are added the
    /// way the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Number of added (special) tokens.
    pub fn added_tokens(&self) -> usize {
        self.inner.get_added_tokens_decoder().len()
    }

    /// The model type of tokenizer.json (`BPE`, `Unigram`, …).
    pub fn model_kind(&self) -> &'static str {
        match self.inner.get_model() {
            tokenizers::ModelWrapper::BPE(_) => "BPE",
            tokenizers::ModelWrapper::Unigram(_) => "Unigram",
            tokenizers::ModelWrapper::WordPiece(_) => "WordPiece",
            tokenizers::ModelWrapper::WordLevel(_) => "WordLevel",
        }
    }

    /// The token text of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The chat template from tokenizer_config.json, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.tokenizer_config
            .as_ref()?
            .get("chat_template")?
            .as_str()
    }
}
