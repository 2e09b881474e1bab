//! Accuracy intervals and the paired test.

/// llama-perplexity's Wilson score interval (95 %, z = 1.95996398454) for `k` right of `n`, as
/// fractions.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let za = 1.959_963_984_54_f64;
    let n = n as f64;
    let f = k as f64 / n;
    let z = za * za / n;
    let cnf = z * (n * (4.0 * f * (1.0 - f) + z)).sqrt() / (za + za);
    let a = (f + z * 0.5 - cnf) / (1.0 + z);
    let b = (f + z * 0.5 + cnf) / (1.0 + z);
    (a, b)
}

/// Exact two-sided McNemar test: with `b` tasks right only in one model and `c` only in the
/// other, the probability under "no difference" (each discordant task equally likely either
/// way, Binomial(b + c, ½)) of a split at least as uneven, doubled and capped at 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Σ_{i ≤ k} C(n, i) / 2ⁿ in log space.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_c = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interval llama.cpp printed for SmolLM2 on 1,000 HellaSwag tasks (399 right:
    /// [36.9091 %, 42.9682 %], shared/data/known-answers.json).
    #[test]
    fn wilson_matches_llama_cpp() {
        let (a, b) = wilson(399, 1000);
        assert!((100.0 * a - 36.9091).abs() < 5e-5, "{a}");
        assert!((100.0 * b - 42.9682).abs() < 5e-5, "{b}");
    }

    /// Against direct binomial sums: b = 3, c = 9 → 2 · (1 + 12 + 66 + 220) / 4096; equal
    /// splits give 1; a one-sided 0 : 10 gives 2 / 1024.
    #[test]
    fn mcnemar_against_binomial_sums() {
        let want = 2.0 * (1.0 + 12.0 + 66.0 + 220.0) / 4096.0;
        assert!((mcnemar_exact(3, 9) - want).abs() < 1e-12);
        assert!((mcnemar_exact(9, 3) - want).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!((mcnemar_exact(0, 10) - 2.0 / 1024.0).abs() < 1e-15);
        // Large counts stay finite and symmetric.
        let p = mcnemar_exact(400, 480);
        assert!(p > 0.0 && p < 0.01, "{p}");
    }
}
