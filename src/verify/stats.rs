//! Numerics shared by the metrics: log-softmax in f64, KL-divergence, summary statistics.

/// `e^x` in f64 within 2 ulp of the correctly rounded value for `x ≥ −708` (exact 0 below,
/// where the true value is under 3·10⁻³⁰⁸): `x = n·ln2 + r`, a degree-13 Taylor polynomial on
/// `|r| ≤ ln2/2`, scaled by `2^n`. Plain arithmetic, so the compiler vectorises the loops below.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    let xc = x.clamp(-708.0, 709.0);
    let n = xc.mul_add(LOG2E, MAGIC) - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p: f64 = 1.0 / 6_227_020_800.0;
    for c in [
        479_001_600.0f64,
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, 1.0 / c);
    }
    let scale = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    if x < -708.0 {
        0.0
    } else {
        p * scale
    }
}

multiversion! {
    /// `out[i] = e^(row[i] − m)`.
    fn exp_shifted(row: &[f32], m: f64, out: &mut [f64]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = exp_f64(x as f64 - m);
        }
    }
}

multiversion! {
    /// `out[i] = e^(lp[i])`.
    fn exp_all(lp: &[f64], out: &mut [f64]) {
        for (o, &x) in out.iter_mut().zip(lp) {
            *o = exp_f64(x);
        }
    }
}

multiversion! {
    fn sum_of(v: &[f64]) -> f64 {
        crate::simd::sum_f64(v)
    }
}

multiversion! {
    fn max_of(v: &[f32]) -> f32 {
        crate::simd::max_f32(v)
    }
}

multiversion! {
    /// `Σ e_i · (lp_i − lq_i)` over terms with `lp_i > −∞`, in [`crate::simd::sum_f64`]'s order.
    fn kl_terms(e: &[f64], lp: &[f64], lq: &[f64]) -> f64 {
        let mut acc = [0f64; 8];
        let n = e.len();
        let mut i = 0;
        while i + 8 <= n {
            for l in 0..8 {
                let a = lp[i + l];
                let t = if a == f64::NEG_INFINITY { 0.0 } else { e[i + l] * (a - lq[i + l]) };
                acc[l] += t;
            }
            i += 8;
        }
        for l in 0..n - i {
            let a = lp[i + l];
            acc[l] += if a == f64::NEG_INFINITY { 0.0 } else { e[i + l] * (a - lq[i + l]) };
        }
        crate::simd::sum_f64(&acc)
    }
}

/// Natural-log softmax of one row, accumulated in f64 (eight interleaved partial sums, folded
/// in a fixed order).
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let lse = log_sum_exp(row);
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// `ln Σ exp(x)` of one row as [`log_softmax`] subtracts it: `log_softmax(row)[i]` is
/// `row[i] as f64 - log_sum_exp(row)`, bit for bit.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = max_of(row) as f64;
    let mut e = vec![0f64; row.len()];
    exp_shifted(row, max, &mut e);
    let sum: f64 = sum_of(&e);
    max + sum.ln()
}

/// KL(P‖Q) = Σ p (log p − log q) for log-probabilities `lp` (reference) and `lq` (candidate).
pub fn kl_divergence(lp: &[f64], lq: &[f64]) -> f64 {
    let mut p = vec![0f64; lp.len()];
    exp_all(lp, &mut p);
    kl_terms(&p, lp, lq).max(0.0)
}

/// Index of the largest value (first on ties).
pub fn argmax_f64(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Mean and standard error of the mean (sample variance, n − 1).
pub fn mean_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The `q`-quantile (0..=1) by linear interpolation between order statistics.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f64_is_within_two_ulp_of_libm() {
        let mut worst = 0u64;
        let mut x = -708.0f64;
        while x < 709.0 {
            let (a, b) = (exp_f64(x), x.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs());
            x += 0.000_913_7;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(0.0), 1.0);
    }

    #[test]
    fn kld_of_identical_rows_is_zero_and_positive_otherwise() {
        let a = log_softmax(&[1.0, 2.0, 3.0]);
        assert!(kl_divergence(&a, &a).abs() < 1e-15);
        let b = log_softmax(&[1.0, 2.5, 3.0]);
        // Hand-computed: p = softmax(1,2,3), q = softmax(1,2.5,3).
        let p: Vec<f64> = a.iter().map(|x| x.exp()).collect();
        let want: f64 = p
            .iter()
            .zip(a.iter().zip(&b))
            .map(|(p, (la, lb))| p * (la - lb))
            .sum();
        assert!((kl_divergence(&a, &b) - want).abs() < 1e-15 && want > 0.0);
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1000.0, 1000.0]);
        assert!((l[0] - (0.5f64).ln()).abs() < 1e-12);
    }

    #[test]
    fn log_sum_exp_is_what_log_softmax_subtracts() {
        // 1,000 values over ±40 (odd length: the interleaved sums' remainder path too).
        let row: Vec<f32> = (0..1001u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) % 8000) as f32 / 100.0 - 40.0)
            .collect();
        let lse = log_sum_exp(&row);
        for (x, l) in row.iter().zip(log_softmax(&row)) {
            assert_eq!((*x as f64 - lse).to_bits(), l.to_bits());
        }
        // Against a plain f64 sum, to well within its rounding (1e-12 relative).
        let plain = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((lse - plain).abs() <= 1e-12 * plain.abs());
    }

    #[test]
    fn summary_statistics() {
        let (m, e) = mean_stderr(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((e - (1.666_666_666_666_666_7f64 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
