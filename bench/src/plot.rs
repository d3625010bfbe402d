//! PNG plots of a comparison (plotters, bitmap backend). Text uses `ab_glyph` with `DejaVu` Sans
//! read at run time from Debian's fonts-dejavu-core, so nothing needs system font libraries.
//!
//! Layout: top row, one latency percentile spectrum per paced case (a line per server); bottom
//! row, `--max` deliveries/s per server, server CPU ns per delivery against offered rate, and
//! server RSS after setup in the memory case.

use crate::compare::{Comparison, Summary};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::error::Error;
use std::path::Path;

/// Font files tried, in order.
pub const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Register a sans-serif font for plot text.
pub fn register_font() -> Result<(), String> {
    for p in FONTS {
        if let Ok(b) = std::fs::read(p) {
            let b: &'static [u8] = Box::leak(b.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, b)
                .map_err(|_| format!("{p} is not a usable font"));
        }
    }
    Err("no TrueType font found: install fonts-dejavu-core (apt-get install -y fonts-dejavu-core)".into())
}

fn color(server: &str, i: usize) -> RGBColor {
    match server {
        "nats" => RGBColor(31, 119, 180),
        "redis" => RGBColor(214, 39, 40),
        "switchboard" => RGBColor(44, 160, 44),
        _ => {
            let (r, g, b) = Palette99::pick(i + 3).to_rgba().rgb();
            RGBColor(r, g, b)
        }
    }
}

/// x position of a percentile on the spectrum axis: -log10(1 - q).
fn spectrum_x(pct: f64) -> Option<f64> {
    let tail = 1.0 - pct / 100.0;
    if tail <= 0.0 { None } else { Some((-tail.log10()).min(5.0)) }
}

fn pct_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

type R = Result<(), Box<dyn Error>>;

fn spectrum_panel(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, case: &str, rows: &[&Summary], servers: &[String]) -> R {
    let pts: Vec<(usize, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|s| {
            let i = servers.iter().position(|n| *n == s.server).unwrap_or(0);
            let v = s.spectrum.iter().filter_map(|(p, us)| Some((spectrum_x(*p)?, us.max(0.1)))).collect();
            (i, v)
        })
        .collect();
    let all: Vec<f64> = pts.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.1) / 1.5;
    let hi = all.iter().copied().fold(1.0, f64::max) * 1.5;
    let xmax = pts.iter().flat_map(|(_, v)| v.iter().map(|p| p.0)).fold(2.0, f64::max).min(5.0);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("latency, {case}"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (lo.min(hi / 2.0)..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| pct_label(*x))
        .y_label_formatter(&|y| if *y >= 1000.0 { format!("{:.0} ms", y / 1000.0) } else { format!("{y:.0} µs") })
        .x_desc("percentile")
        .draw()?;
    for (i, v) in pts {
        let c = color(&servers[i], i);
        chart
            .draw_series(LineSeries::new(v, c.stroke_width(2)))?
            .label(servers[i].clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn bars_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    bars: &[(String, f64)],
    servers: &[String],
    fmt: &dyn Fn(f64) -> String,
) -> R {
    // Discrete coordinates include their end: 0..=n-1 gives n segments.
    let n = bars.len().max(1) as u32;
    let ymax = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..ymax)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| fmt(*y))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
        let k = servers.iter().position(|s| s == name).unwrap_or(i);
        let mut r = Rectangle::new([(SegmentValue::Exact(i as u32), 0.0), (SegmentValue::Exact(i as u32 + 1), *v)], color(name, k).filled());
        r.set_margin(0, 0, 18, 18);
        r
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let style = ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
        Text::new(fmt(*v), (SegmentValue::CenterOf(i as u32), *v), style)
    }))?;
    Ok(())
}

fn cpu_panel(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, c: &Comparison, paced: &[String], servers: &[String]) -> R {
    let series: Vec<(usize, Vec<(f64, f64)>)> = servers
        .iter()
        .enumerate()
        .map(|(i, srv)| {
            let pts = c
                .summary
                .iter()
                .filter(|s| &s.server == srv && s.runs > 0 && paced.contains(&s.case))
                .filter_map(|s| Some((s.rate? / 1000.0, s.cpu_ns_per_delivery?)))
                .collect();
            (i, pts)
        })
        .collect();
    let xmax = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.0)).fold(1.0, f64::max) * 1.15;
    let ymax = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("server CPU per delivery", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("offered publishes/s (k)")
        .y_label_formatter(&|y| format!("{y:.0} ns"))
        .draw()?;
    for (i, pts) in series {
        let col = color(&servers[i], i);
        chart
            .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
            .label(servers[i].clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, col.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// Draw the comparison into a PNG at `path`.
pub fn plot(c: &Comparison, path: &Path) -> R {
    register_font()?;
    let servers: Vec<String> = c.servers.iter().map(|s| s.name.clone()).collect();
    let main_sessions = c.cases.first().map_or(0, |k| k.sessions);
    let paced: Vec<String> =
        c.cases.iter().filter(|k| k.rate.is_some() && k.sessions == main_sessions).map(|k| k.name.clone()).collect();
    let max_case = c.cases.iter().find(|k| k.rate.is_none()).map(|k| k.name.clone());
    let mem_case = c.cases.iter().find(|k| k.sessions != main_sessions).map(|k| k.name.clone());

    let root = BitMapBackend::new(path, (1600, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.draw(&Text::new(
        format!(
            "Switchboard vs NATS vs Redis — {} sessions × {} subscribers, {} gateways, {} publishers, {} B; medians of {} run(s); {} ({} CPUs)",
            main_sessions, c.workload.subscribers, c.workload.gateways, c.workload.publishers, c.workload.payload, c.reps, c.host.kernel, c.host.cpus_online
        ),
        (12, 10),
        ("sans-serif", 18).into_font(),
    ))?;
    let (top, bottom) = body.split_vertically(500);
    let tops = top.split_evenly((1, paced.len().max(1)));
    for (area, case) in tops.iter().zip(&paced) {
        let rows: Vec<&Summary> = c.summary.iter().filter(|s| &s.case == case && s.runs > 0).collect();
        spectrum_panel(area, case, &rows, &servers)?;
    }
    let bottoms = bottom.split_evenly((1, 3));
    let bars = |case: &Option<String>, f: &dyn Fn(&Summary) -> Option<f64>| -> Vec<(String, f64)> {
        c.summary
            .iter()
            .filter(|s| Some(&s.case) == case.as_ref() && s.runs > 0)
            .filter_map(|s| Some((s.server.clone(), f(s)?)))
            .collect()
    };
    bars_panel(
        &bottoms[0],
        "throughput: --max deliveries/s",
        &bars(&max_case, &|s| Some(s.deliveries_per_s)),
        &servers,
        &|v| format!("{:.2} M", v / 1e6),
    )?;
    cpu_panel(&bottoms[1], c, &paced, &servers)?;
    bars_panel(
        &bottoms[2],
        &format!("memory: RSS after setup, {}", mem_case.as_deref().unwrap_or("-")),
        &bars(&mem_case, &|s| s.rss_setup_mib),
        &servers,
        &|v| format!("{v:.0} MiB"),
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis() {
        assert_eq!(pct_label(0.0), "0%");
        assert_eq!(pct_label(2.0), "99%");
        assert_eq!(pct_label(4.0), "99.99%");
        assert!((spectrum_x(99.9).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(spectrum_x(100.0), None);
    }
}
