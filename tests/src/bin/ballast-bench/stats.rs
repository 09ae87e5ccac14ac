//! Repeated measurements: median and range.

/// The values of one measurement over its runs.
#[derive(Clone, Debug, Default)]
pub struct Series(pub Vec<f64>);

impl Series {
    /// Adds a run's value.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (0 when empty).
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// "median (min–max)" with `decimals`.
    pub fn cell(&self, decimals: usize) -> String {
        let v = self.sorted();
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) if v.len() > 1 => {
                format!("{} ({}–{})", fmt_num(self.median(), decimals), fmt_num(*lo, decimals), fmt_num(*hi, decimals))
            }
            (Some(x), _) => fmt_num(*x, decimals),
            _ => "—".into(),
        }
    }
}

/// A number with `decimals` and thin-space thousands separators for big integers.
pub fn fmt_num(x: f64, decimals: usize) -> String {
    if decimals == 0 {
        let s = format!("{:.0}", x);
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", s.as_str()));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{x:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_cell() {
        let s = Series(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.cell(1), "2.5 (1.0–10.0)");
        assert_eq!(fmt_num(1234567.0, 0), "1 234 567");
        assert_eq!(fmt_num(-1234.0, 0), "-1 234");
        assert_eq!(Series::default().cell(0), "—");
    }
}
