//! The SVG report of a run: publish -> receive latency over time (top,
//! logarithmic) and open connections over time (bottom, per gateway node when
//! there are several), with the run's markers (publishing started, cut, drain)
//! as vertical lines. Plain SVG 1.1, no script, no external resource.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::report::{RunResult, Sample};

const W: f64 = 960.0;
const H: f64 = 640.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const PLOT_W: f64 = W - LEFT - RIGHT;
/// Top panel (latency) and bottom panel (connections): (top y, height).
const LAT: (f64, f64) = (92.0, 210.0);
const CONN: (f64, f64) = (370.0, 210.0);

const COLORS: [&str; 8] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
];

/// Escapes text for SVG character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n`
/// ticks up to `max`.
pub fn nice_step(max: f64, n: usize) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / n.max(1) as f64;
    let pow = 10f64.powf(raw.log10().floor());
    let m = raw / pow;
    let f = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * pow
}

fn fmt_num(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{}M", trim(v / 1_000_000.0))
    } else if v >= 10_000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Polylines (one per unbroken run of points) of `points` (`None` breaks the line).
fn polylines(points: &[Option<(f64, f64)>], color: &str, width: f64, dash: Option<&str>) -> String {
    let mut out = String::new();
    let mut run: Vec<(f64, f64)> = Vec::new();
    let flush = |run: &mut Vec<(f64, f64)>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        if run.len() == 1 {
            let (x, y) = run[0];
            let _ = writeln!(
                out,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="2" fill="{color}"/>"#
            );
        } else {
            let pts: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="{width}"{} points="{}"/>"#,
                dash.map(|d| format!(r#" stroke-dasharray="{d}""#))
                    .unwrap_or_default(),
                pts.join(" ")
            );
        }
        run.clear();
    };
    for p in points {
        match p {
            Some(xy) if xy.0.is_finite() && xy.1.is_finite() => run.push(*xy),
            _ => flush(&mut run, &mut out),
        }
    }
    flush(&mut run, &mut out);
    out
}

struct Axis {
    t_max: f64,
}

impl Axis {
    fn x(&self, t: f64) -> f64 {
        LEFT + (t / self.t_max).clamp(0.0, 1.0) * PLOT_W
    }

    fn draw(&self, out: &mut String, (top, h): (f64, f64)) {
        let bottom = top + h;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{h}" fill="#fcfcfc" stroke="#999"/>"##
        );
        let step = nice_step(self.t_max, 10);
        let mut t = 0.0;
        while t <= self.t_max + 1e-9 {
            let x = self.x(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                bottom + 14.0,
                trim(t)
            );
            t += step;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the run started</text>"#,
            LEFT + PLOT_W / 2.0,
            bottom + 30.0
        );
    }
}

fn latency_panel(out: &mut String, axis: &Axis, tl: &[Sample]) {
    let (top, h) = LAT;
    let bottom = top + h;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{:.1}" class="h">Publish -> receive latency per interval (ms, log scale)</text>"#,
        top - 8.0
    );
    axis.draw(out, LAT);
    let values: Vec<f64> = tl
        .iter()
        .flat_map(|s| [s.p50_ms, s.p99_ms, s.max_ms])
        .flatten()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if values.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="note">no message was delivered in this run</text>"#,
            LEFT + PLOT_W / 2.0,
            top + h / 2.0
        );
        return;
    }
    let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = values.iter().cloned().fold(0.0, f64::max);
    let d0 = lo.max(1e-3).log10().floor();
    let d1 = hi.max(1e-3).log10().ceil().max(d0 + 1.0);
    let y = |v: f64| bottom - (v.max(1e-3).log10() - d0) / (d1 - d0) * h;
    let mut d = d0;
    while d <= d1 + 1e-9 {
        let v = 10f64.powf(d);
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + PLOT_W,
            LEFT - 6.0,
            yy + 4.0,
            trim(v)
        );
        d += 1.0;
    }
    type Series<'a> = (&'a str, &'a str, f64, fn(&Sample) -> Option<f64>);
    let series: [Series; 3] = [
        ("max", "#d62728", 1.0, |s| s.max_ms),
        ("p99", "#ff7f0e", 1.8, |s| s.p99_ms),
        ("p50", "#1f77b4", 1.8, |s| s.p50_ms),
    ];
    for (i, (name, color, width, get)) in series.iter().enumerate() {
        let pts: Vec<Option<(f64, f64)>> = tl
            .iter()
            .map(|s| get(s).filter(|v| *v > 0.0).map(|v| (axis.x(s.t_s), y(v))))
            .collect();
        out.push_str(&polylines(&pts, color, *width, None));
        legend(
            out,
            LEFT + PLOT_W - 60.0 - 70.0 * i as f64,
            top + 14.0,
            color,
            name,
        );
    }
}

fn legend(out: &mut String, x: f64, y: f64, color: &str, name: &str) {
    let _ = writeln!(
        out,
        r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        y - 4.0,
        x + 18.0,
        y + 1.0,
        escape(name)
    );
}

fn connections_panel(out: &mut String, axis: &Axis, tl: &[Sample]) {
    let (top, h) = CONN;
    let bottom = top + h;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{:.1}" class="h">Open connections (client side; per gateway node from the connected frames)</text>"#,
        top - 8.0
    );
    axis.draw(out, CONN);
    let max = tl.iter().map(|s| s.connections).max().unwrap_or(0).max(1) as f64;
    let step = nice_step(max, 5);
    let top_v = (max / step).ceil() * step;
    let y = |v: f64| bottom - v / top_v * h;
    let mut v = 0.0;
    while v <= top_v + 1e-9 {
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + PLOT_W,
            LEFT - 6.0,
            yy + 4.0,
            fmt_num(v)
        );
        v += step;
    }
    let nodes: BTreeSet<&String> = tl.iter().flat_map(|s| s.by_node.keys()).collect();
    if nodes.len() > 1 {
        for (i, node) in nodes.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<Option<(f64, f64)>> = tl
                .iter()
                .map(|s| {
                    Some((
                        axis.x(s.t_s),
                        y(s.by_node.get(*node).copied().unwrap_or(0) as f64),
                    ))
                })
                .collect();
            out.push_str(&polylines(&pts, color, 1.5, Some("5,3")));
            legend(out, LEFT + 10.0 + 110.0 * i as f64, top + 14.0, color, node);
        }
    }
    let pts: Vec<Option<(f64, f64)>> = tl
        .iter()
        .map(|s| Some((axis.x(s.t_s), y(s.connections as f64))))
        .collect();
    out.push_str(&polylines(&pts, "#222", 2.0, None));
    legend(out, LEFT + PLOT_W - 60.0, top + 14.0, "#222", "total");
}

/// The whole report as one SVG document.
pub fn render(r: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">
<style>.t{{font-size:16px;font-weight:bold}} .h{{font-size:12px;font-weight:bold}} .note{{fill:#888;font-size:13px}} .m{{fill:#555;font-size:10px}}</style>
<rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="26" class="t">loadtest run {} — {}</text>"#,
        escape(&r.scenario),
        escape(&r.started_at)
    );
    // The RESULT line, in two lines when long.
    let line = r.result_line();
    let (a, b) = match line.char_indices().rfind(|(i, c)| *c == ';' && *i < 120) {
        Some((i, _)) if line.len() > 130 => (&line[..=i], line[i + 1..].trim_start()),
        _ => (line.as_str(), ""),
    };
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="42">{}</text><text x="{LEFT}" y="55">{}</text>"#,
        escape(a),
        escape(b)
    );
    let m = &r.machine;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="69" class="m">{} CPUs, {:.1} GiB; load average at start {:.2}, at end {:.2}; {} node(s), {} worker process(es)</text>"#,
        m.cpus,
        m.mem_gib,
        m.load_before[0],
        m.load_after[0],
        r.setup.nodes.len(),
        r.setup.workers
    );
    let t_max = r
        .timeline
        .iter()
        .map(|s| s.t_s)
        .chain(r.markers.iter().map(|m| m.t_s))
        .fold(r.duration_s, f64::max)
        .max(1.0);
    let axis = Axis { t_max };
    latency_panel(&mut out, &axis, &r.timeline);
    connections_panel(&mut out, &axis, &r.timeline);
    for (i, mk) in r.markers.iter().enumerate() {
        let x = axis.x(mk.t_s);
        // Labels of the right half go left of their line, so they stay inside.
        let right = x > LEFT + PLOT_W * 0.6;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#666" stroke-dasharray="3,3"/><text x="{:.1}" y="{:.1}" class="m" text-anchor="{}">{}</text>"##,
            LAT.0,
            CONN.0 + CONN.1,
            if right { x - 3.0 } else { x + 3.0 },
            LAT.0 + 26.0 + 11.0 * (i % 6) as f64,
            if right { "end" } else { "start" },
            escape(&mk.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::scenario::report::Marker;

    fn sample(t: f64, conns: u64, p50: Option<f64>) -> Sample {
        Sample {
            t_s: t,
            connections: conns,
            by_node: BTreeMap::new(),
            delivered_per_s: 0.0,
            connects_per_s: 0.0,
            p50_ms: p50,
            p99_ms: p50.map(|v| v * 3.0),
            max_ms: p50.map(|v| v * 10.0),
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(escape("x\u{1}y"), "x y");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 10), 10.0);
        assert_eq!(nice_step(19_000.0, 5), 5000.0);
        assert_eq!(nice_step(7.0, 10), 1.0);
        assert_eq!(nice_step(0.0, 10), 1.0);
        assert_eq!(nice_step(f64::NAN, 10), 1.0);
        assert_eq!(fmt_num(20_000.0), "20k");
        assert_eq!(fmt_num(2.5), "2.5");
    }

    #[test]
    fn polylines_break_on_missing_points() {
        let pts = [
            Some((1.0, 2.0)),
            Some((3.0, 4.0)),
            None,
            Some((5.0, 6.0)),
            Some((f64::NAN, 1.0)),
        ];
        let s = polylines(&pts, "red", 1.0, None);
        assert_eq!(s.matches("<polyline").count(), 1);
        assert_eq!(s.matches("<circle").count(), 1);
        assert!(s.contains(r#"points="1.0,2.0 3.0,4.0""#), "{s}");
    }

    #[test]
    fn renders_a_complete_document() {
        let mut r = RunResult {
            scenario: "drain <&>".into(),
            started_at: "2026-11-22T10:00:00Z".into(),
            duration_s: 30.0,
            ..RunResult::default()
        };
        for i in 0..30 {
            let mut s = sample(
                f64::from(i),
                1000 - u64::from(i as u32) * 10,
                (i % 7 != 3).then_some(1.0 + f64::from(i)),
            );
            s.by_node.insert("node1".into(), 900);
            s.by_node.insert("node2".into(), 100);
            r.timeline.push(s);
        }
        r.markers.push(Marker {
            t_s: 10.0,
            label: "drain node1".into(),
        });
        let svg = render(&r);
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("drain &lt;&amp;&gt;"), "title escaped");
        assert!(!svg.contains("drain <&>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // p50/p99/max broken at the one missing interval, totals, two nodes.
        assert!(svg.matches("<polyline").count() >= 6 + 3, "{svg}");
        assert!(svg.contains("node2") && svg.contains(">drain node1<"));
        // Every opened element is closed: balanced tags.
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn renders_without_data() {
        let svg = render(&RunResult::default());
        assert!(svg.contains("no message was delivered"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
