//! Durations and rates as text, for every renderer: the text report's two decimals, the
//! dashboard's three significant digits (its columns are narrow), and bucket bounds.

/// A duration with two decimals in its unit: `412ns`, `1.25us`, `12.30ms`, `1.50s`.
pub fn ns(ns: u64) -> String {
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.2}us", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", f / 1e6)
    } else {
        format!("{:.2}s", f / 1e9)
    }
}

/// A duration in three significant digits, for a narrow column: `412ns`, `1.25us`, `12.3ms`,
/// `150s`.
pub fn ns3(ns: u64) -> String {
    let (v, unit) = match ns {
        0..1_000 => return format!("{ns}ns"),
        1_000..1_000_000 => (ns as f64 / 1e3, "us"),
        1_000_000..1_000_000_000 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v >= 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.2}{unit}")
    }
}

/// A histogram bucket's bound as a short label, whole units: `512ns`, `16us`, `2ms`, `1s`.
pub fn bound(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}us", ns / 1_000),
        1_000_000..1_000_000_000 => format!("{}ms", ns / 1_000_000),
        _ => format!("{}s", ns / 1_000_000_000),
    }
}

/// A rate per second: whole from 100 up, else one decimal.
pub fn per_sec(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_keeps_its_digits() {
        assert_eq!(ns(412), "412ns");
        assert_eq!(ns(12_300_000), "12.30ms");
        assert_eq!(ns3(12_300_000), "12.3ms");
        assert_eq!(ns3(1_250), "1.25us");
        assert_eq!(ns3(150_000_000_000), "150s");
        assert_eq!(bound(16_384), "16us");
        assert_eq!(per_sec(12.34), "12.3");
        assert_eq!(per_sec(100.4), "100");
    }
}
