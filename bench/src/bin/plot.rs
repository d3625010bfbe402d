//! `plot RESULTS.json [OUT.png]`: re-draw the PNG of a saved comparison.

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(input) = args.next() else {
        eprintln!("usage: plot RESULTS.json [OUT.png]");
        std::process::exit(2);
    };
    let out = args.next().unwrap_or_else(|| {
        std::path::Path::new(&input).with_file_name("compare.png").display().to_string()
    });
    let c: switchboard_bench::compare::Comparison = match std::fs::read_to_string(&input)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plot: {input}: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = switchboard_bench::plot::plot(&c, std::path::Path::new(&out)) {
        eprintln!("plot: {e}");
        std::process::exit(1);
    }
    println!("{out}");
}
