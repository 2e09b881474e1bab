//! The Llama-specific part of the GGUF layout: llama.cpp stores Q and K rows in the
//! interleaved-pair RoPE order, so exporting permutes them and loading undoes it
//! (formats/gguf.md#export).

/// Reorders the rows of a Q or K weight (`[heads·d, cols]`) from the Hugging Face layout (the
/// two rotated halves of each head apart) to llama.cpp's (rotated pairs adjacent): new row
/// `h·d + 2i + j` is old row `h·d + j·d/2 + i`.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let new = h * d + 2 * i + j;
                let old = h * d + j * (d / 2) + i;
                out[new * cols..(new + 1) * cols].copy_from_slice(&w[old * cols..(old + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of [`permute_rows`], on whole rows of raw bytes (quantized rows included: blocks
/// never cross rows).
pub fn unpermute_row_bytes(b: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let rb = b.len() / rows;
    let d = rows / heads;
    let mut out = vec![0u8; b.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let gg = h * d + 2 * i + j;
                let hf = h * d + j * (d / 2) + i;
                out[hf * rb..(hf + 1) * rb].copy_from_slice(&b[gg * rb..(gg + 1) * rb]);
            }
        }
    }
    out
}
