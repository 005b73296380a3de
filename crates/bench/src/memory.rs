//! The process's peak resident set size (Linux `VmHWM`), and resetting it so a figure
//! is one step's, not the generator's or a floor's.

/// Peak resident set size of this process, in MB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The peak RSS for a report line (`n/a` where the system does not tell).
pub fn rss() -> String {
    peak_rss_mb().map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0} MB"))
}

/// Resets the peak RSS counter (Linux: `echo 5 > /proc/self/clear_refs`).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
