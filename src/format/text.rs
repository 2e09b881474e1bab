//! Text inputs (perplexity text, calibration text, prompt files): UTF-8 with no binary
//! content. A model file or an archive passed where text belongs is refused by name and
//! offset instead of being tokenized into garbage statistics.

use std::path::Path;

use crate::error::{Error, Result};

/// Reads `path` as text; see [`decode`].
pub fn read(path: &Path) -> Result<String> {
    Ok(read_hashed(path)?.0)
}

/// [`read`], with the sha256 of the file's bytes (one read for both).
pub fn read_hashed(path: &Path) -> Result<(String, String)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sha = crate::format::safetensors::sha256_bytes(&bytes);
    Ok((decode(path, bytes)?, sha))
}

/// Checks that `bytes` are text: valid UTF-8, no NUL byte, and no more than one control
/// character (other than tab, newline, carriage return and form feed) per 1,000 characters.
/// Real text in any language passes; safetensors, GGUF, gzip and zip files fail in their first
/// bytes.
pub fn decode(path: &Path, bytes: Vec<u8>) -> Result<String> {
    if let Some(i) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::format(
            path,
            format!("binary data, not text: NUL byte at offset {i}"),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text: invalid byte at offset {} (is this a binary file?)",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let control = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\u{c}');
    let n_control = text.chars().filter(|&c| control(c)).count();
    let n = text.chars().count();
    if n_control * 1000 > n.max(1) {
        let (i, c) = text
            .char_indices()
            .find(|&(_, c)| control(c))
            .expect("counted above");
        return Err(Error::format(
            path,
            format!(
                "binary data, not text: {n_control} control characters in {n} (first: U+{:04X} at byte {i})",
                c as u32
            ),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(b: &[u8]) -> std::result::Result<String, String> {
        decode(Path::new("t.txt"), b.to_vec()).map_err(|e| e.to_string())
    }

    #[test]
    fn text_passes_and_binary_is_named() {
        assert!(check("naïve café\tx\r\n\u{c}日本語 ".as_bytes()).is_ok());
        assert!(check(b"").is_ok());
        let e = check(b"GGUF\x03\x00\x00\x00").unwrap_err();
        assert!(e.contains("NUL byte at offset 5"), "{e}");
        let e = check(b"ab\xff\xfe").unwrap_err();
        assert!(e.contains("offset 2"), "{e}");
        let e = check(b"abc\x1b\x1b").unwrap_err();
        assert!(e.contains("U+001B at byte 3"), "{e}");
        // One escape sequence in a long text is still text.
        let mut long = "a".repeat(5000).into_bytes();
        long[100] = 0x1b;
        assert!(check(&long).is_ok());
    }
}
