//! `minitron-convert inspect`: what a checkpoint folder holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::error::Result;
use crate::model::{Checkpoint, RopeScaling, Tokenizer};

/// Builds the inspection report (JSON) of an opened checkpoint.
pub fn report(ck: &Checkpoint, verbose: bool) -> Result<Value> {
    let c = &ck.config;
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let mut tensors = Vec::new();
    for f in &ck.files {
        for (name, t) in &f.tensors {
            *by_dtype.entry(t.dtype.to_string()).or_default() += (t.end - t.start) as u64;
            if verbose {
                tensors.push(json!({
                    "name": name, "dtype": t.dtype.name(), "shape": t.shape,
                    "file": f.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                }));
            }
        }
    }
    let rope = match &c.rope_scaling {
        RopeScaling::None => json!({"theta": c.rope_theta, "scaling": null}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({"theta": c.rope_theta, "scaling": {
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings}}),
    };
    let tokenizer = match Tokenizer::load(&ck.dir) {
        Ok(t) => json!({
            "model": t.model_kind(),
            "vocab_size": t.vocab_size(),
            "added_tokens": t.added_tokens(),
            "adds_bos": t.adds_bos,
            "bos": t.bos_id.map(|id| json!({"id": id, "token": t.id_to_token(id)})),
            "eos": t.eos_ids.iter().map(|&id| json!({"id": id, "token": t.id_to_token(id)})).collect::<Vec<_>>(),
            "chat_template": t.chat_template().is_some(),
        }),
        Err(e) => json!({"error": e.to_string()}),
    };
    let files: Vec<Value> = ck
        .files
        .iter()
        .map(|f| {
            json!({
                "file": f.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "bytes": std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0),
                "tensors": f.tensors.len(),
            })
        })
        .collect();
    let mut v = json!({
        "dir": ck.dir.display().to_string(),
        "architecture": "LlamaForCausalLM",
        "parameters": ck.parameter_count(),
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "lm_head": if ck.index.contains_key(crate::model::names::LM_HEAD) { "untied" } else { "tied (embeddings)" },
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "torch_dtype": c.torch_dtype,
        "rope": rope,
        "bytes_by_dtype": by_dtype,
        "files": files,
        "unexpected_tensors": ck.unexpected,
        "tokenizer": tokenizer,
    });
    if verbose {
        v["tensors"] = Value::Array(tensors);
    }
    Ok(v)
}

/// Human-readable rendering of [`report`].
pub fn table(v: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| v[k].to_string().trim_matches('"').to_owned();
    let _ = writeln!(s, "{}", g("dir"));
    let _ = writeln!(s, "  architecture     {}", g("architecture"));
    let _ = writeln!(
        s,
        "  parameters       {}",
        group_digits(v["parameters"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(
        s,
        "  layers           {} (hidden {}, MLP {})",
        g("layers"),
        g("hidden_size"),
        g("intermediate_size")
    );
    let _ = writeln!(
        s,
        "  attention        {} heads / {} KV heads (GQA {}:1), head_dim {}",
        g("attention_heads"),
        g("kv_heads"),
        v["attention_heads"].as_u64().unwrap_or(0) / v["kv_heads"].as_u64().unwrap_or(1).max(1),
        g("head_dim")
    );
    let _ = writeln!(s, "  vocab            {}", g("vocab_size"));
    let _ = writeln!(s, "  lm_head          {}", g("lm_head"));
    let rope = &v["rope"];
    let _ = writeln!(
        s,
        "  rope             theta {}{}",
        rope["theta"],
        if rope["scaling"].is_null() {
            ", no scaling".to_owned()
        } else {
            let r = &rope["scaling"];
            format!(
                ", llama3 (factor {}, low {}, high {}, original ctx {})",
                r["factor"],
                r["low_freq_factor"],
                r["high_freq_factor"],
                r["original_max_position_embeddings"]
            )
        }
    );
    let _ = writeln!(s, "  rms_norm_eps     {}", g("rms_norm_eps"));
    let _ = writeln!(s, "  max positions    {}", g("max_position_embeddings"));
    if let Some(m) = v["bytes_by_dtype"].as_object() {
        let parts: Vec<String> = m
            .iter()
            .map(|(k, b)| format!("{k} {}", human_bytes(b.as_u64().unwrap_or(0))))
            .collect();
        let _ = writeln!(s, "  bytes by dtype   {}", parts.join(", "));
    }
    if let Some(files) = v["files"].as_array() {
        let _ = writeln!(s, "  files            {}", files.len());
        for f in files {
            let _ = writeln!(
                s,
                "    {:<40} {:>10}  {} tensors",
                f["file"].as_str().unwrap_or("?"),
                human_bytes(f["bytes"].as_u64().unwrap_or(0)),
                f["tensors"]
            );
        }
    }
    let t = &v["tokenizer"];
    if t.get("error").is_some() {
        let _ = writeln!(
            s,
            "  tokenizer        unavailable: {}",
            t["error"].as_str().unwrap_or("")
        );
    } else {
        let eos: Vec<String> = t["eos"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["id"], e["token"].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  tokenizer        {} {} tokens ({} added), adds BOS: {}, bos {}, eos [{}], chat template: {}",
            t["model"].as_str().unwrap_or("?"),
            t["vocab_size"],
            t["added_tokens"],
            t["adds_bos"],
            if t["bos"].is_null() {
                "none".to_owned()
            } else {
                format!("{} {}", t["bos"]["id"], t["bos"]["token"].as_str().unwrap_or("?"))
            },
            eos.join(", "),
            t["chat_template"]
        );
    }
    if let Some(u) = v["unexpected_tensors"].as_array() {
        if !u.is_empty() {
            let _ = writeln!(
                s,
                "  unexpected       {} tensors not used by the architecture:",
                u.len()
            );
            for n in u {
                let _ = writeln!(s, "    {}", n.as_str().unwrap_or("?"));
            }
        }
    }
    if let Some(ts) = v["tensors"].as_array() {
        let _ = writeln!(s, "  tensors:");
        for t in ts {
            let _ = writeln!(
                s,
                "    {:<52} {:<8} {:<18} {}",
                t["name"].as_str().unwrap_or("?"),
                t["dtype"].as_str().unwrap_or("?"),
                t["shape"].to_string(),
                t["file"].as_str().unwrap_or("?")
            );
        }
    }
    s
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in decimal units, as disk sizes are usually quoted.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < units.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {}", units[u])
    }
}

/// A metadata value as JSON; arrays longer than 8 shortened to their first values and length
/// unless `full`.
fn gguf_value_json(v: &crate::format::gguf::Value, full: bool) -> serde_json::Value {
    use crate::format::gguf::Value as V;
    use serde_json::json;
    match v {
        V::U8(x) => json!(x),
        V::I8(x) => json!(x),
        V::U16(x) => json!(x),
        V::I16(x) => json!(x),
        V::U32(x) => json!(x),
        V::I32(x) => json!(x),
        V::F32(x) => json!(x),
        V::Bool(x) => json!(x),
        V::String(s) => json!(s),
        V::U64(x) => json!(x),
        V::I64(x) => json!(x),
        V::F64(x) => json!(x),
        V::Array(_, items) if !full && items.len() > 8 => json!({
            "len": items.len(),
            "first": items[..8].iter().map(|i| gguf_value_json(i, full)).collect::<Vec<_>>(),
        }),
        V::Array(_, items) => json!(items
            .iter()
            .map(|i| gguf_value_json(i, full))
            .collect::<Vec<_>>()),
    }
}

fn gguf_type_name(v: &crate::format::gguf::Value) -> String {
    use crate::format::gguf::Value as V;
    match v {
        V::U8(_) => "u8".into(),
        V::I8(_) => "i8".into(),
        V::U16(_) => "u16".into(),
        V::I16(_) => "i16".into(),
        V::U32(_) => "u32".into(),
        V::I32(_) => "i32".into(),
        V::F32(_) => "f32".into(),
        V::Bool(_) => "bool".into(),
        V::String(_) => "str".into(),
        V::U64(_) => "u64".into(),
        V::I64(_) => "i64".into(),
        V::F64(_) => "f64".into(),
        V::Array(_, items) => format!(
            "{}[{}]",
            items.first().map_or("?".into(), gguf_type_name),
            items.len()
        ),
    }
}

/// `minitron-convert dump --json`: header, metadata (with types) and tensor table.
pub fn gguf_json(g: &crate::format::gguf::GgufFile, full: bool) -> serde_json::Value {
    serde_json::json!({
        "file": g.path.display().to_string(),
        "version": g.version,
        "alignment": g.alignment,
        "metadata": g.metadata.iter().map(|(k, v)| serde_json::json!({
            "key": k, "type": gguf_type_name(v), "value": gguf_value_json(v, full)
        })).collect::<Vec<_>>(),
        "tensors": g.tensors.iter().map(|t| serde_json::json!({
            "name": t.name, "type": t.ty.name(), "dims": t.dims, "offset": t.offset, "bytes": t.nbytes()
        })).collect::<Vec<_>>(),
    })
}

/// `minitron-convert dump`: the same as text, one line per key and per tensor.
pub fn gguf_text(g: &crate::format::gguf::GgufFile, full: bool) -> String {
    let mut s = format!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, alignment {}\n\n",
        g.path.display(),
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment
    );
    for (i, (k, v)) in g.metadata.iter().enumerate() {
        let val = match v {
            crate::format::gguf::Value::String(t) if !full && t.len() > 80 => {
                format!(
                    "{:?}… ({} bytes)",
                    t.chars().take(60).collect::<String>(),
                    t.len()
                )
            }
            _ => gguf_value_json(v, full).to_string(),
        };
        s.push_str(&format!(
            "{:>4}  {:<44} {:<12} {}\n",
            i + 1,
            k,
            gguf_type_name(v),
            val
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "{:>4}  {:<34} {:<6} {:<22} {:>12}\n",
        "#", "tensor", "type", "dims", "bytes"
    ));
    for (i, t) in g.tensors.iter().enumerate() {
        let dims: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        s.push_str(&format!(
            "{:>4}  {:<34} {:<6} {:<22} {:>12}\n",
            i + 1,
            t.name,
            t.ty.name(),
            dims.join(" × "),
            t.nbytes()
        ));
    }
    s
}
