//! The Llama-specific part of the GGUF layout: llama.cpp stores Q and K rows in the
//! interleaved-pair RoPE order, so exporting permutes them and loading undoes it
//! (formats/gguf.md#export).

/// The row moves of the Q/K permutation for `rows` rows of `heads` heads: pairs (GGUF row, Hugging
/// Face row). Within each head of `d` rows, GGUF row `2i + j` is Hugging Face row `j·d/2 + i`
/// (the two rotated halves interleaved into adjacent pairs).
fn row_pairs(rows: usize, heads: usize) -> impl Iterator<Item = (usize, usize)> {
    let d = rows / heads;
    (0..heads).flat_map(move |h| {
        (0..d / 2)
            .flat_map(move |i| (0..2).map(move |j| (h * d + 2 * i + j, h * d + j * (d / 2) + i)))
    })
}

/// Reorders the rows of a Q or K weight (`[heads·d, cols]`) from the Hugging Face layout (the
/// two rotated halves of each head apart) to llama.cpp's (rotated pairs adjacent).
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (gg, hf) in row_pairs(rows, heads) {
        out[gg * cols..(gg + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
    }
    out
}

/// [`permute_rows`] on whole rows of raw bytes (`rows` rows of equal length, any dtype).
pub fn permute_row_bytes(b: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let rb = b.len() / rows.max(1);
    let mut out = vec![0u8; b.len()];
    for (gg, hf) in row_pairs(rows, heads) {
        out[gg * rb..(gg + 1) * rb].copy_from_slice(&b[hf * rb..(hf + 1) * rb]);
    }
    out
}

/// The inverse of [`permute_rows`], on whole rows of raw bytes (quantized rows included: blocks
/// never cross rows).
pub fn unpermute_row_bytes(b: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let rb = b.len() / rows;
    let mut out = vec![0u8; b.len()];
    for (gg, hf) in row_pairs(rows, heads) {
        out[hf * rb..(hf + 1) * rb].copy_from_slice(&b[gg * rb..(gg + 1) * rb]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let (rows, cols, heads) = (8, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let p = permute_rows(&w, rows, cols, heads);
        // Head 0 (d = 4): new rows 0,1,2,3 = old rows 0,2,1,3.
        assert_eq!(
            &p[..12],
            &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
        );
        let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(permute_row_bytes(&wb, rows, heads), bytes);
        let back = unpermute_row_bytes(&bytes, rows, heads);
        let back: Vec<f32> = back
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(back, w);
    }
}
