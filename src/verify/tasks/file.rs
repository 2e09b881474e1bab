//! Task files (formats/tasks.md): HellaSwag in llama.cpp's six-lines-a-task layout or as the
//! original `hellaswag_val.jsonl`, our multiple-choice JSONL, and llama.cpp's Winogrande CSV.
//! A line that does not follow its layout is an error naming the file, the line and the field.

use std::path::Path;

use crate::error::{Error, Result};

/// One multiple-choice task, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// 1-based line where the task starts in its file.
    pub line: usize,
    pub gold: usize,
    pub kind: TaskKind,
}

/// How a task's choices become texts, and which tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskKind {
    /// Choice `i`'s text is `context + delimiter + choices[i]`; the tokens after the texts'
    /// common prefix are scored (HellaSwag, `--choices`).
    Endings {
        context: String,
        delimiter: String,
        choices: Vec<String>,
    },
    /// Choice `i`'s text is `first + options[i] + second`; the shared `second` part is scored
    /// (Winogrande).
    Partial {
        first: String,
        options: Vec<String>,
        second: String,
    },
}

impl Task {
    pub fn choices(&self) -> usize {
        match &self.kind {
            TaskKind::Endings { choices, .. } => choices.len(),
            TaskKind::Partial { options, .. } => options.len(),
        }
    }
}

fn bad(path: &Path, line: usize, field: &str, msg: impl Into<String>) -> Error {
    Error::TaskFile {
        path: path.to_path_buf(),
        line,
        field: field.into(),
        msg: msg.into(),
    }
}

fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        bad(path, line, "text", "not UTF-8")
    })
}

/// Lines as C++'s `getline` splits them: a final newline ends the last line rather than
/// starting an empty one.
fn lines(text: &str) -> Vec<&str> {
    let mut v: Vec<&str> = text.split('\n').collect();
    if text.ends_with('\n') {
        v.pop();
    }
    v
}

/// A HellaSwag file: llama.cpp's six-line layout, or the original JSONL (first non-blank
/// character `{`).
pub fn hellaswag(path: &Path) -> Result<Vec<Task>> {
    let text = read(path)?;
    if text.trim_start().starts_with('{') {
        return hellaswag_jsonl(path, &text);
    }
    let ls = lines(&text);
    if ls.is_empty() || !ls.len().is_multiple_of(6) {
        return Err(bad(
            path,
            0,
            "layout",
            format!(
                "{} lines; llama.cpp's HellaSwag layout has 6 per task (context, gold index, 4 endings)",
                ls.len()
            ),
        ));
    }
    ls.chunks(6)
        .enumerate()
        .map(|(i, t)| {
            let line = 6 * i + 1;
            if t[0].trim().is_empty() {
                return Err(bad(path, line, "context", "empty"));
            }
            let gold: usize = t[1].trim().parse().map_err(|_| {
                bad(
                    path,
                    line + 1,
                    "gold",
                    format!("`{}` is not 0, 1, 2 or 3", t[1]),
                )
            })?;
            if gold > 3 {
                return Err(bad(
                    path,
                    line + 1,
                    "gold",
                    format!("{gold} is out of range 0..=3"),
                ));
            }
            for (j, e) in t[2..].iter().enumerate() {
                if e.trim().is_empty() {
                    return Err(bad(path, line + 2 + j, &format!("ending {j}"), "empty"));
                }
            }
            Ok(Task {
                line,
                gold,
                kind: TaskKind::Endings {
                    context: t[0].to_string(),
                    delimiter: " ".into(),
                    choices: t[2..].iter().map(|s| s.to_string()).collect(),
                },
            })
        })
        .collect()
}

/// lm-eval's HellaSwag text cleanup: trim, ` [title]` → `. `, other `[...]` removed, double
/// spaces made single.
pub fn hellaswag_clean(s: &str) -> String {
    let s = s.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find('[') {
        match rest[i..].find(']') {
            Some(j) => {
                out.push_str(&rest[..i]);
                rest = &rest[i + j + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

fn capitalize(s: &str) -> String {
    // Python's str.capitalize: first character upper, the rest lower.
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

fn json_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    lines(text)
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn parse_obj(
    path: &Path,
    line: usize,
    l: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str::<serde_json::Value>(l) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad(path, line, "json", "not a JSON object")),
        Err(e) => Err(bad(path, line, "json", e.to_string())),
    }
}

fn str_field(
    path: &Path,
    line: usize,
    m: &serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> Result<String> {
    match m.get(k) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(path, line, k, "not a string")),
        None => Err(bad(path, line, k, "missing")),
    }
}

fn str_list(
    path: &Path,
    line: usize,
    m: &serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> Result<Vec<String>> {
    let v = m
        .get(k)
        .ok_or_else(|| bad(path, line, k, "missing"))?
        .as_array()
        .ok_or_else(|| bad(path, line, k, "not a list"))?;
    v.iter()
        .enumerate()
        .map(|(i, x)| match x.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
            Some(_) => Err(bad(path, line, &format!("{k}[{i}]"), "empty")),
            None => Err(bad(path, line, &format!("{k}[{i}]"), "not a string")),
        })
        .collect()
}

fn gold_field(
    path: &Path,
    line: usize,
    m: &serde_json::Map<String, serde_json::Value>,
    k: &str,
    n: usize,
) -> Result<usize> {
    let v = m.get(k).ok_or_else(|| bad(path, line, k, "missing"))?;
    let g = match v {
        serde_json::Value::Number(x) => x.as_u64(),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad(path, line, k, format!("`{v}` is not a choice index")))?;
    if g as usize >= n {
        return Err(bad(path, line, k, format!("{g} is out of range 0..{n}")));
    }
    Ok(g as usize)
}

/// The original HellaSwag JSONL, cleaned as lm-eval cleans it.
fn hellaswag_jsonl(path: &Path, text: &str) -> Result<Vec<Task>> {
    json_lines(text)
        .map(|(line, l)| {
            let m = parse_obj(path, line, l)?;
            let label = str_field(path, line, &m, "activity_label")?;
            let a = str_field(path, line, &m, "ctx_a")?;
            let b = str_field(path, line, &m, "ctx_b")?;
            let endings = str_list(path, line, &m, "endings")?;
            if endings.len() != 4 {
                return Err(bad(
                    path,
                    line,
                    "endings",
                    format!("{} endings, not 4", endings.len()),
                ));
            }
            let gold = gold_field(path, line, &m, "label", 4)?;
            Ok(Task {
                line,
                gold,
                kind: TaskKind::Endings {
                    context: hellaswag_clean(&format!("{label}: {a} {}", capitalize(&b))),
                    delimiter: " ".into(),
                    choices: endings.iter().map(|e| hellaswag_clean(e)).collect(),
                },
            })
        })
        .collect()
}

/// Our multiple-choice JSONL: `{"query", "choices", "gold"}` per line, optional `"fewshot"`
/// (text put before the query) and `"delimiter"` (between query and choice, default a space).
pub fn choices(path: &Path) -> Result<Vec<Task>> {
    let text = read(path)?;
    let v: Vec<Task> = json_lines(&text)
        .map(|(line, l)| {
            let m = parse_obj(path, line, l)?;
            let query = str_field(path, line, &m, "query")?;
            let choices = str_list(path, line, &m, "choices")?;
            if choices.len() < 2 {
                return Err(bad(path, line, "choices", "fewer than 2"));
            }
            let gold = gold_field(path, line, &m, "gold", choices.len())?;
            let fewshot = match m.get("fewshot") {
                None => String::new(),
                Some(_) => str_field(path, line, &m, "fewshot")?,
            };
            let delimiter = match m.get("delimiter") {
                None => " ".to_string(),
                Some(_) => str_field(path, line, &m, "delimiter")?,
            };
            Ok(Task {
                line,
                gold,
                kind: TaskKind::Endings {
                    context: fewshot + &query,
                    delimiter,
                    choices,
                },
            })
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(bad(path, 0, "tasks", "no tasks in the file"));
    }
    Ok(v)
}

/// llama.cpp's Winogrande CSV: `index,sentence,option1,option2,answer` per line, the sentence
/// quoted when it holds commas, `_` where an option goes, answer 1 or 2. A first line that is
/// a header (`index,…`) is skipped.
pub fn winogrande(path: &Path) -> Result<Vec<Task>> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, l) in lines(&text).into_iter().enumerate() {
        let line = i + 1;
        let l = l.strip_suffix('\r').unwrap_or(l);
        if l.trim().is_empty() || (i == 0 && l.starts_with("index,")) {
            continue;
        }
        // The first four commas outside quotes split the five fields.
        let mut commas = Vec::with_capacity(4);
        let mut quoted = false;
        for (k, ch) in l.char_indices() {
            match ch {
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    commas.push(k);
                    if commas.len() == 4 {
                        break;
                    }
                }
                _ => {}
            }
        }
        if commas.len() != 4 {
            return Err(bad(path, line, "layout", "not 5 comma-separated fields"));
        }
        let field = |a: usize, b: usize| &l[a..b];
        let mut sentence = field(commas[0] + 1, commas[1]);
        if sentence.len() >= 2 && sentence.starts_with('"') && sentence.ends_with('"') {
            sentence = &sentence[1..sentence.len() - 1];
        }
        let o1 = field(commas[1] + 1, commas[2]);
        let o2 = field(commas[2] + 1, commas[3]);
        let answer = field(commas[3] + 1, l.len());
        let Some(w) = sentence.find('_') else {
            return Err(bad(path, line, "sentence", "no `_` where the option goes"));
        };
        for (name, o) in [("option1", o1), ("option2", o2)] {
            if o.trim().is_empty() {
                return Err(bad(path, line, name, "empty"));
            }
        }
        let gold = match answer.trim() {
            "1" => 0,
            "2" => 1,
            a => return Err(bad(path, line, "answer", format!("`{a}` is not 1 or 2"))),
        };
        out.push(Task {
            line,
            gold,
            kind: TaskKind::Partial {
                first: sentence[..w].to_string(),
                options: vec![o1.to_string(), o2.to_string()],
                second: sentence[w + 1..].to_string(),
            },
        });
    }
    if out.is_empty() {
        return Err(bad(path, 0, "tasks", "no tasks in the file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, body: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("minitron-taskfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn err_of(r: Result<Vec<Task>>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        e.to_string()
    }

    #[test]
    fn hellaswag_layout_and_its_errors() {
        let good = "Ctx: a b\n2\ne0\ne1\ne2\ne3\nCtx2: c\n0\nf0\nf1\nf2\nf3\n";
        let p = tmp("hs.txt", good);
        let t = hellaswag(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].gold, 2);
        assert_eq!(t[1].line, 7);
        let e = err_of(hellaswag(&tmp("hs5.txt", "a\n1\nb\nc\nd\n")));
        assert!(e.contains("hs5.txt:0: layout: 5 lines"), "{e}");
        let e = err_of(hellaswag(&tmp("hsg.txt", &good.replace("\n0\n", "\n4\n"))));
        assert!(e.contains("hsg.txt:8: gold: 4 is out of range"), "{e}");
        let e = err_of(hellaswag(&tmp("hse.txt", &good.replace("f2", " "))));
        assert!(e.contains("hse.txt:11: ending 2: empty"), "{e}");
        let e = err_of(hellaswag(&tmp("hsx.txt", &good.replace("\n2\n", "\nx\n"))));
        assert!(e.contains("hsx.txt:2: gold"), "{e}");
    }

    #[test]
    fn jsonl_files_and_their_errors() {
        let p = tmp(
            "c.jsonl",
            "{\"query\": \"Q1\", \"choices\": [\"a\", \"b\"], \"gold\": 1}\n\n{\"query\": \"Q2\", \"choices\": [\"a\", \"b\", \"c\"], \"gold\": 0, \"fewshot\": \"F \"}\n",
        );
        let t = choices(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].line, 3);
        match &t[1].kind {
            TaskKind::Endings { context, .. } => assert_eq!(context, "F Q2"),
            k => panic!("{k:?}"),
        }
        let e = err_of(choices(&tmp(
            "b.jsonl",
            "{\"query\": \"Q\", \"choices\": [\"a\", \"b\"], \"gold\": 1}\n{\"query\": \"Q\",\n",
        )));
        assert!(e.contains("b.jsonl:2: json:"), "{e}");
        let e = err_of(choices(&tmp(
            "g.jsonl",
            "{\"query\": \"Q\", \"choices\": [\"a\", \"b\"], \"gold\": 2}\n",
        )));
        assert!(e.contains("g.jsonl:1: gold: 2 is out of range 0..2"), "{e}");
        let e = err_of(choices(&tmp(
            "m.jsonl",
            "{\"choices\": [\"a\", \"b\"], \"gold\": 0}\n",
        )));
        assert!(e.contains("m.jsonl:1: query: missing"), "{e}");
        let e = err_of(choices(&tmp(
            "e.jsonl",
            "{\"query\": \"Q\", \"choices\": [\"a\", \"\"], \"gold\": 0}\n",
        )));
        assert!(e.contains("e.jsonl:1: choices[1]: empty"), "{e}");
        // The original HellaSwag JSONL, cleaned as lm-eval does.
        let p = tmp(
            "hs.jsonl",
            "{\"activity_label\": \"Cooking\", \"ctx_a\": \"A man [header] cooks.\", \"ctx_b\": \"THEN he\", \"endings\": [\"eats [title] it\", \"b\", \"c\", \"d\"], \"label\": \"3\"}\n",
        );
        let t = hellaswag(&p).unwrap();
        assert_eq!(t[0].gold, 3);
        match &t[0].kind {
            TaskKind::Endings {
                context, choices, ..
            } => {
                assert_eq!(context, "Cooking: A man cooks. Then he");
                assert_eq!(choices[0], "eats. it");
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn winogrande_csv_and_its_errors() {
        let p = tmp(
            "w.csv",
            "index,sentence,option1,option2,answer\n0,\"Sarah, not Maria, so _ won.\",Sarah,Maria,2\n",
        );
        let t = winogrande(&p).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].gold, 1);
        assert_eq!(
            t[0].kind,
            TaskKind::Partial {
                first: "Sarah, not Maria, so ".into(),
                options: vec!["Sarah".into(), "Maria".into()],
                second: " won.".into()
            }
        );
        let e = err_of(winogrande(&tmp("w3.csv", "0,No blank here.,A,B,1\n")));
        assert!(e.contains("w3.csv:1: sentence"), "{e}");
        let e = err_of(winogrande(&tmp("w4.csv", "0,So _ won.,A,B,3\n")));
        assert!(e.contains("w4.csv:1: answer"), "{e}");
    }
}
