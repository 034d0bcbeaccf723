//! This machine's memory as the planner reads it (`/proc`), and the size units `--budget` takes
//! and the tables print.

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `MemAvailable` of /proc/meminfo, if readable.
pub fn available_memory() -> Option<u64> {
    meminfo_field("/proc/meminfo", "MemAvailable:")
}

/// This process's resident memory (`VmRSS`).
pub fn resident_memory() -> Option<u64> {
    meminfo_field("/proc/self/status", "VmRSS:")
}

/// Peak resident memory of this process (`VmHWM`).
pub fn peak_resident_memory() -> Option<u64> {
    meminfo_field("/proc/self/status", "VmHWM:")
}

/// Peak resident memory (`VmHWM`) of process `pid`, e.g. a child's.
pub fn peak_resident_memory_of(pid: u32) -> Option<u64> {
    meminfo_field(&format!("/proc/{pid}/status"), "VmHWM:")
}

fn meminfo_field(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `8GiB`, `512MiB`, `8G`, `1.5GB`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 8GiB, 512MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (B, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((value * scale as f64) as u64)
}
