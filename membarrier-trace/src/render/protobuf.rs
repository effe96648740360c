//! The Prometheus protobuf exposition (`application/vnd.google.protobuf;
//! proto=io.prometheus.client.MetricFamily; encoding=delimited`): what a Prometheus with native
//! histograms asks for. The duration histograms go as native histograms (schema 3: 8 buckets
//! per power of two), one series each where the classic form takes 116: the kernel's buckets
//! (16 per power of two) each go whole into the native bucket that holds their upper edge, so
//! a quantile is within one native bucket (9%) plus one kernel bucket (6%) of the truth.
//!
//! The messages (metrics.proto, proto2): MetricFamily {1 name, 2 help, 3 type, 4 metric},
//! Metric {1 label, 2 gauge, 3 counter, 7 histogram}, LabelPair {1 name, 2 value},
//! Gauge/Counter {1 value}, Histogram {1 sample_count, 2 sample_sum, 5 schema,
//! 6 zero_threshold, 7 zero_count, 12 positive_span {1 offset, 2 length}, 13 positive_delta}.

use std::collections::BTreeMap;

/// Native histogram schema: 2^3 buckets per power of two.
pub const SCHEMA: i32 = 3;

/// Client libraries' default zero bucket width: also what marks a histogram as native.
const ZERO_THRESHOLD: f64 = 2.938_735_877_055_719e-39;

/// Writes delimited MetricFamily messages; a family goes out when the next one begins (or at
/// [`Proto::finish`]), and not at all without a metric.
#[derive(Default)]
pub struct Proto {
    out: Vec<u8>,
    family: Vec<u8>,
    metrics: usize,
    kind: u64,
}

// The family types of metrics.proto.
const COUNTER: u64 = 0;
const GAUGE: u64 = 1;
const HISTOGRAM: u64 = 4;
const UNTYPED: u64 = 3;

impl Proto {
    /// A family: `name` as the text format's family would be named (a counter's with
    /// `_total`, an info's with `_info`), `kind` as there.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.flush();
        let (name, kind) = match kind {
            "counter" => (format!("{name}_total"), COUNTER),
            "gauge" => (name.to_string(), GAUGE),
            "info" => (format!("{name}_info"), GAUGE),
            "histogram" => (name.to_string(), HISTOGRAM),
            _ => (name.to_string(), UNTYPED),
        };
        bytes(&mut self.family, 1, name.as_bytes());
        bytes(&mut self.family, 2, help.as_bytes());
        key(&mut self.family, 3, 0);
        varint(&mut self.family, kind);
        self.kind = kind;
    }

    /// A counter's or gauge's value, with `labels` as the text format writes them.
    pub fn sample(&mut self, labels: &str, value: f64) {
        let mut m = label_pairs(labels);
        let mut v = Vec::new();
        double(&mut v, 1, value);
        bytes(&mut m, if self.kind == COUNTER { 3 } else { 2 }, &v);
        self.metric(&m);
    }

    /// A duration histogram from the kernel's buckets (inclusive upper bound in ns, count).
    pub fn histogram(
        &mut self,
        labels: &str,
        buckets: &BTreeMap<u64, u64>,
        count: u64,
        sum_ns: u64,
    ) {
        let mut h = Vec::new();
        key(&mut h, 1, 0);
        varint(&mut h, count);
        double(&mut h, 2, sum_ns as f64 / 1e9);
        key(&mut h, 5, 0);
        varint(&mut h, zigzag(i64::from(SCHEMA)));
        double(&mut h, 6, ZERO_THRESHOLD);
        key(&mut h, 7, 0);
        varint(&mut h, 0);
        let native = native_buckets(buckets);
        let mut prev_index: Option<i32> = None;
        let mut spans: Vec<(i32, u32)> = Vec::new();
        for &index in native.keys() {
            match (prev_index, spans.last_mut()) {
                (Some(p), Some(last)) if index == p + 1 => last.1 += 1,
                (Some(p), _) => spans.push((index - p - 1, 1)),
                (None, _) => spans.push((index, 1)),
            }
            prev_index = Some(index);
        }
        for (offset, length) in spans {
            let mut s = Vec::new();
            key(&mut s, 1, 0);
            varint(&mut s, zigzag(i64::from(offset)));
            key(&mut s, 2, 0);
            varint(&mut s, u64::from(length));
            bytes(&mut h, 12, &s);
        }
        let mut prev = 0i64;
        for &n in native.values() {
            key(&mut h, 13, 0);
            varint(&mut h, zigzag(n as i64 - prev));
            prev = n as i64;
        }
        let mut m = label_pairs(labels);
        bytes(&mut m, 7, &h);
        self.metric(&m);
    }

    fn metric(&mut self, m: &[u8]) {
        bytes(&mut self.family, 4, m);
        self.metrics += 1;
    }

    fn flush(&mut self) {
        if self.metrics > 0 {
            varint(&mut self.out, self.family.len() as u64);
            self.out.extend_from_slice(&self.family);
        }
        self.family.clear();
        self.metrics = 0;
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }
}

/// The kernel's buckets by native bucket index: the one holding each kernel bucket's upper
/// edge, `ceil(log2(le) * 2^SCHEMA)` with `le` in seconds.
pub fn native_buckets(buckets: &BTreeMap<u64, u64>) -> BTreeMap<i32, u64> {
    let mut out = BTreeMap::new();
    for (&le_ns, &n) in buckets.iter().filter(|(_, n)| **n > 0) {
        let le = le_ns.max(1) as f64 / 1e9;
        let index = (le.log2() * f64::from(1 << SCHEMA)).ceil() as i32;
        *out.entry(index).or_default() += n;
    }
    out
}

/// The text format's labels (`k="v",...`, escaped) as LabelPair fields.
fn label_pairs(labels: &str) -> Vec<u8> {
    let mut m = Vec::new();
    for (k, v) in parse_labels(labels) {
        let mut p = Vec::new();
        bytes(&mut p, 1, k.as_bytes());
        bytes(&mut p, 2, v.as_bytes());
        bytes(&mut m, 1, &p);
    }
    m
}

/// `k="v",...` back into pairs, undoing the escapes of `\\`, `\"` and `\n`.
pub fn parse_labels(labels: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = labels.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => {}
                },
                c => value.push(c),
            }
        }
        out.push((name, value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, field << 3 | wire);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn double(out: &mut Vec<u8>, field: u64, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        let pairs = [
            ("pid", "42"),
            ("comm", "a\"b\\c\nd"),
            ("caller", "knotd+0x1a"),
        ];
        let text = pairs
            .iter()
            .map(|(k, v)| {
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                format!("{k}=\"{v}\"")
            })
            .collect::<Vec<_>>()
            .join(",");
        let back = parse_labels(&text);
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(back, want);
        assert!(parse_labels("").is_empty());
    }

    /// Schema 3's buckets around 1 us: 953 ns is under 2^-20 s (953.67 ns, index -160), 1,000
    /// ns in the next (to 1,040 ns), 1,062 ns in the one after; the wire's varint and zigzag.
    #[test]
    fn native_indices_and_wire_forms() {
        // 2^-20 s = 953.67 ns: a bucket edge; 1,000 ns is just above, in the next one.
        let b = BTreeMap::from([(953, 1), (1_000, 2), (1_062, 3)]);
        let n = native_buckets(&b);
        assert_eq!(n, BTreeMap::from([(-160, 1), (-159, 2), (-158, 3)]));
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(-160), 319);
    }
}
