//! Numerics shared by the metrics: log-softmax in f64, KL-divergence, summary statistics.

/// Natural-log softmax of one row, accumulated in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(P‖Q) = Σ p (log p − log q) for log-probabilities `lp` (reference) and `lq` (candidate).
pub fn kl_divergence(lp: &[f64], lq: &[f64]) -> f64 {
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| {
            if a == f64::NEG_INFINITY {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum::<f64>()
        .max(0.0)
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
    fn summary_statistics() {
        let (m, e) = mean_stderr(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((e - (1.666_666_666_666_666_7f64 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
