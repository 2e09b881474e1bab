//! A Hugging Face byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) as GGUF's
//! `tokenizer.*` metadata, in llama.cpp's order and with its token types.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::format::gguf::{keys, Value};
use crate::model::Checkpoint;

/// Detects llama.cpp's pre-tokenizer name from tokenizer.json's `pre_tokenizer`.
pub fn detect_pre(tokenizer: &Json) -> Option<&'static str> {
    let pre = tokenizer.get("pre_tokenizer")?;
    let parts: Vec<&Json> = match pre.get("type")?.as_str()? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("type")?.as_str())
        .collect();
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match kinds.as_slice() {
        ["Split", "ByteLevel"] => {
            let re = parts[0].get("pattern")?.get("Regex")?.as_str()?;
            (re == LLAMA3).then_some("llama-bpe")
        }
        ["Digits", "ByteLevel"] => {
            let individual = parts[0].get("individual_digits")?.as_bool()?;
            let byte_regex = parts[1].get("use_regex")?.as_bool()?;
            (individual && byte_regex).then_some("smollm")
        }
        _ => None,
    }
}

pub(crate) fn read_json(p: &Path) -> Result<Option<Json>> {
    if !p.exists() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&t)
        .map(Some)
        .map_err(|e| Error::format(p, format!("not valid JSON: {e}")))
}

/// Tokenizer metadata (`tokenizer.*` keys) in llama.cpp's order; `pre` names the
/// pre-tokenizer when it cannot be detected (`--gguf-pre`).
pub fn tokenizer_metadata(ck: &Checkpoint, pre: Option<&str>) -> Result<Vec<(String, Value)>> {
    let tpath = ck.dir.join("tokenizer.json");
    let tj = read_json(&tpath)?
        .ok_or_else(|| Error::format(&ck.dir, "no tokenizer.json in this folder"))?;
    let tc = read_json(&ck.dir.join("tokenizer_config.json"))?.unwrap_or(json!({}));
    let model = tj
        .get("model")
        .ok_or_else(|| Error::format(&tpath, "no `model` section"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(Error::Unsupported(format!(
            "{}: only byte-level BPE tokenizers are exported to GGUF",
            tpath.display()
        )));
    }
    let n_vocab = ck.config.vocab_size;
    let Vocab {
        names,
        kinds,
        by_text,
    } = vocab(&tj, model, n_vocab, &tpath)?;
    let merges = merges(model);
    let pre = match (pre, detect_pre(&tj)) {
        (Some(p), _) => p.to_owned(),
        (None, Some(p)) => p.to_string(),
        (None, None) => {
            return Err(Error::Unsupported(format!(
                "{}: the pre-tokenizer is not one llama.cpp knows by structure (Llama-3's split pattern or SmolLM's digit split); name it with --gguf-pre (e.g. llama-bpe)",
                tpath.display()
            )))
        }
    };
    let mut md: Vec<(String, Value)> = Vec::new();
    if let Some(b) = tc.get("add_prefix_space").and_then(|v| v.as_bool()) {
        md.push((keys::TOKENIZER_ADD_SPACE_PREFIX.into(), Value::Bool(b)));
    }
    md.push((keys::TOKENIZER_MODEL.into(), Value::String("gpt2".into())));
    md.push((keys::TOKENIZER_PRE.into(), Value::String(pre)));
    md.push((keys::TOKENIZER_TOKENS.into(), Value::strings(names)));
    md.push((
        keys::TOKENIZER_TOKEN_TYPE.into(),
        Value::Array(5, kinds.into_iter().map(Value::I32).collect()),
    ));
    md.push((keys::TOKENIZER_MERGES.into(), Value::strings(merges)));
    md.extend(special_ids(ck, &tc, &by_text));
    md.extend(add_flags(&tj, &tc));
    if let Some(t) = tc.get("chat_template").and_then(|v| v.as_str()) {
        md.push((
            keys::TOKENIZER_CHAT_TEMPLATE.into(),
            Value::String(t.into()),
        ));
    }
    Ok(md)
}

/// Token texts and llama.cpp token types by id, and ids by text.
struct Vocab {
    names: Vec<String>,
    kinds: Vec<i32>,
    by_text: std::collections::HashMap<String, u32>,
}

/// The BPE vocabulary and added tokens; ids no token names become `[PADi]` (type 5).
fn vocab(tj: &Json, model: &Json, n_vocab: usize, tpath: &Path) -> Result<Vocab> {
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut kinds = vec![1i32; n_vocab];
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| Error::format(tpath, "no BPE vocab"))?;
    let mut by_text = std::collections::HashMap::new();
    for (t, id) in vocab {
        if let Some(i) = id.as_u64().map(|v| v as usize).filter(|&i| i < n_vocab) {
            tokens[i] = Some(t.clone());
            by_text.insert(t.clone(), i as u32);
        }
    }
    for a in tj
        .get("added_tokens")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(i), Some(t)) = (
            a.get("id").and_then(|v| v.as_u64()),
            a.get("content").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let i = i as usize;
        if i >= n_vocab {
            continue;
        }
        tokens[i] = Some(t.to_string());
        by_text.insert(t.to_string(), i as u32);
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        let looks = (t.starts_with("<|") && t.ends_with("|>"))
            || ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
            || (t.starts_with("<unused") && t.ends_with('>'));
        kinds[i] = if special || looks { 3 } else { 4 };
    }
    let mut names = Vec::with_capacity(n_vocab);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => names.push(t),
            None => {
                names.push(format!("[PAD{i}]"));
                kinds[i] = 5;
            }
        }
    }
    Ok(Vocab {
        names,
        kinds,
        by_text,
    })
}

/// The BPE merges as `a b` strings (either of tokenizer.json's two spellings).
fn merges(model: &Json) -> Vec<String> {
    model
        .get("merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect()
}

/// Special token ids: tokenizer_config.json's tokens first, then config.json's ids for the
/// rest.
fn special_ids(
    ck: &Checkpoint,
    tc: &Json,
    by_text: &std::collections::HashMap<String, u32>,
) -> Vec<(String, Value)> {
    let n_vocab = ck.config.vocab_size;
    let mut md = Vec::new();
    let kinds = [
        ("bos", keys::TOKENIZER_BOS_ID),
        ("eos", keys::TOKENIZER_EOS_ID),
        ("unk", keys::TOKENIZER_UNK_ID),
        ("sep", keys::TOKENIZER_SEP_ID),
        ("pad", keys::TOKENIZER_PAD_ID),
        ("cls", keys::TOKENIZER_CLS_ID),
        ("mask", keys::TOKENIZER_MASK_ID),
    ];
    let mut found: Vec<(usize, u32)> = Vec::new();
    for (k, (typ, _)) in kinds.iter().enumerate() {
        let id = match tc.get(format!("{typ}_token")) {
            Some(Json::String(s)) => by_text.get(s).copied(),
            Some(Json::Object(m)) => m
                .get("content")
                .and_then(|c| c.as_str())
                .and_then(|s| by_text.get(s).copied()),
            _ => None,
        };
        if let Some(id) = id {
            found.push((k, id));
        }
    }
    for (k, (typ, _)) in kinds.iter().enumerate() {
        if found.iter().any(|(f, _)| *f == k) {
            continue;
        }
        let v = ck.config_json.get(format!("{typ}_token_id"));
        let id = match v {
            Some(Json::Number(n)) => n.as_u64(),
            Some(Json::Array(a)) => a.first().and_then(|x| x.as_u64()),
            _ => None,
        };
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            found.push((k, id as u32));
        }
    }
    for (k, id) in found {
        md.push((kinds[k].1.to_string(), Value::U32(id)));
    }
    md
}

/// add_bos/add_eos: tokenizer_config.json's flags, else the post-processor's template.
fn add_flags(tj: &Json, tc: &Json) -> Vec<(String, Value)> {
    let mut md = Vec::new();
    let (mut add_bos, mut add_eos) = (
        tc.get("add_bos_token").and_then(|v| v.as_bool()),
        tc.get("add_eos_token").and_then(|v| v.as_bool()),
    );
    if add_bos.is_none() && add_eos.is_none() {
        if let Some(single) = template_single(tj) {
            let specials: Vec<bool> = single
                .iter()
                .map(|p| p.get("SpecialToken").is_some())
                .collect();
            add_bos = Some(specials.first().copied().unwrap_or(false));
            add_eos = Some(specials.len() > 1 && specials.last().copied().unwrap_or(false));
        }
    }
    if let Some(b) = add_bos {
        md.push((keys::TOKENIZER_ADD_BOS.into(), Value::Bool(b)));
    }
    if let Some(e) = add_eos {
        md.push((keys::TOKENIZER_ADD_EOS.into(), Value::Bool(e)));
    }
    md
}

/// The `single` template of a TemplateProcessing post-processor (alone or in a Sequence).
fn template_single(tj: &Json) -> Option<&Vec<Json>> {
    let pp = tj.get("post_processor")?;
    let procs: Vec<&Json> = match pp.get("type")?.as_str()? {
        "Sequence" => pp.get("processors")?.as_array()?.iter().collect(),
        _ => vec![pp],
    };
    procs
        .into_iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing"))?
        .get("single")?
        .as_array()
}
