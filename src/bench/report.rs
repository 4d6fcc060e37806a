//! What `beds bench` measured: counts, a latency histogram, the node's CPU
//! and memory from /proc, and how it is printed (human lines, one JSON line).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One worker's tally; merged at the end of a run.
pub struct Tally {
    /// Round-trip time of each request, in microseconds.
    pub hist: Histogram<u64>,
    pub requests: u64,
    /// Requests every operation of which succeeded.
    pub ok_requests: u64,
    pub ops: u64,
    pub ok_ops: u64,
    /// Failed operations by error code.
    pub errors: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            // 1 µs .. 1 h, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            requests: 0,
            ok_requests: 0,
            ops: 0,
            ok_ops: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        let _ = self.hist.add(&other.hist);
        self.requests += other.requests;
        self.ok_requests += other.ok_requests;
        self.ops += other.ops;
        self.ok_ops += other.ok_ops;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// CPU time and resident size of one process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// user + system time, in seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: ticks as f64 / clock_ticks(),
        rss_kib,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Busy and total jiffies of the whole machine (first line of /proc/stat).
pub fn machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// A `beds` node process other than this one, when exactly one runs here.
pub fn find_node() -> Option<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beds" {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let one_shot = args
            .iter()
            .any(|a| matches!(*a, b"bench" | b"bench-serve" | b"call" | b"check"));
        if !one_shot {
            found.push(pid);
        }
    }
    (found.len() == 1).then(|| found[0])
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: u64,
}

/// The serving process's cost over the measured run: the BEDS node, or the
/// reference's `beds bench-serve` process.
#[derive(Debug, Clone, Serialize)]
pub struct ServerCost {
    pub pid: u32,
    /// CPU time (user + system) per request, µs.
    pub cpu_us_per_request: f64,
    /// CPU time per operation, µs (differs from the above with `--batch`).
    pub cpu_us_per_op: f64,
    /// Average cores the node kept busy.
    pub cores_busy: f64,
    /// Cores the node would need for 40,000 requests/s at this cost.
    pub cores_for_40k_rps: f64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
    pub rss_kib_min: u64,
    pub rss_kib_max: u64,
    /// (max - min) / start, percent.
    pub rss_spread_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `beds`, or the reference: `pipeline`, `broker`, `database`.
    pub mode: String,
    pub template: String,
    pub mix: String,
    pub concurrency: usize,
    pub batch: usize,
    pub persistent: bool,
    /// Requests published without waiting for RabbitMQ's confirm.
    pub no_confirm: bool,
    pub connections: usize,
    /// Requests sent before measuring: finding or creating keys, warm-up.
    pub seed_requests: u64,
    pub warmup_requests: u64,
    /// The measured run: requests sent, and those every operation of which
    /// succeeded.
    pub requests: u64,
    pub ok_requests: u64,
    pub ops: u64,
    pub ok_ops: u64,
    pub elapsed_s: f64,
    /// Successful requests and operations per second.
    pub requests_per_s: f64,
    pub ops_per_s: f64,
    /// Round trip of each successful request, µs.
    pub latency_us: Latency,
    /// Failed operations by code.
    pub errors: BTreeMap<String, u64>,
    /// CPU and memory of the process serving the requests: the BEDS node
    /// (when its pid is known) or the reference process. None for the
    /// database reference, which this process runs itself.
    pub server: Option<ServerCost>,
    /// This process's CPU per request, µs: the load generator (and the
    /// `CALL`s themselves in `database` mode).
    pub bench_cpu_us_per_request: f64,
    /// Whole machine CPU busy over the run, percent of all cores.
    pub machine_cpu_busy_pct: f64,
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean().round() as u64,
    }
}

/// `12345` → `12,345`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl Report {
    pub fn print_human(&self) {
        let dur = Duration::from_secs_f64(self.elapsed_s);
        println!(
            "{} — {} {} | {} in flight | batch {} | {} | {} connection(s)",
            self.mode,
            self.template,
            self.mix,
            self.concurrency,
            self.batch,
            match (self.persistent, self.no_confirm) {
                (true, false) => "persistent",
                (false, false) => "transient",
                (true, true) => "persistent, no confirms",
                (false, true) => "transient, no confirms",
            },
            self.connections
        );
        println!(
            "  requests  {} ({} ok) in {:.1} s = {} req/s   ops {} = {} ops/s   (warm-up {}, seeding {})",
            thousands(self.requests),
            thousands(self.ok_requests),
            dur.as_secs_f64(),
            thousands(self.requests_per_s.round() as u64),
            thousands(self.ops),
            thousands(self.ops_per_s.round() as u64),
            thousands(self.warmup_requests),
            thousands(self.seed_requests),
        );
        let l = &self.latency_us;
        println!(
            "  latency   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            ms(l.mean)
        );
        if self.errors.is_empty() {
            println!("  errors    none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v)))
                .collect();
            println!("  errors    {}", list.join(", "));
        }
        if let Some(n) = &self.server {
            println!(
                "  server    pid {}: {:.0} µs CPU/request ({:.0} µs/op), {:.2} cores busy; 40,000 req/s would take {:.1} cores",
                n.pid, n.cpu_us_per_request, n.cpu_us_per_op, n.cores_busy, n.cores_for_40k_rps
            );
            println!(
                "  rss       {:.1} → {:.1} MiB (min {:.1}, max {:.1}, spread {:.1} %)",
                n.rss_kib_start as f64 / 1024.0,
                n.rss_kib_end as f64 / 1024.0,
                n.rss_kib_min as f64 / 1024.0,
                n.rss_kib_max as f64 / 1024.0,
                n.rss_spread_pct
            );
        }
        println!(
            "  bench     {:.0} µs CPU/request in this process; machine {:.0} % busy",
            self.bench_cpu_us_per_request, self.machine_cpu_busy_pct
        );
    }
}

/// The side-by-side table of `--compare`: every run as a ratio of the
/// pipeline (requests) and the database (operations) references.
pub fn print_comparison(reports: &[Report]) {
    let find = |m: &str| reports.iter().find(|r| r.mode == m);
    let pipeline = find("pipeline");
    let database = find("database");
    println!();
    println!(
        "{:<9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "mode", "req/s", "ops/s", "p50", "p99", "p99.9", "vs pipeline", "vs database"
    );
    for r in reports {
        let ratio = |base: Option<&Report>, f: fn(&Report) -> f64| {
            base.filter(|b| f(b) > 0.0)
                .map(|b| format!("{:.0} %", 100.0 * f(r) / f(b)))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12}",
            r.mode,
            thousands(r.requests_per_s.round() as u64),
            thousands(r.ops_per_s.round() as u64),
            ms(r.latency_us.p50),
            ms(r.latency_us.p99),
            ms(r.latency_us.p999),
            ratio(pipeline, |x| x.requests_per_s),
            ratio(database, |x| x.ops_per_s),
        );
    }
    if let (Some(b), Some(i)) = (find("beds"), find("beds+ids")) {
        if b.requests_per_s > 0.0 {
            let cpu = match (&b.server, &i.server) {
                (Some(bs), Some(is)) if bs.cpu_us_per_request > 0.0 => format!(
                    ", {:.0} % of the node CPU per request",
                    100.0 * is.cpu_us_per_request / bs.cpu_us_per_request
                ),
                _ => String::new(),
            };
            println!(
                "with message ids (writes through the durable inbox): {:.0} % of the throughput{cpu}",
                100.0 * i.requests_per_s / b.requests_per_s
            );
        }
    }
    if let (Some(on), Some(off)) = (find("beds+log"), find("beds-log")) {
        if off.requests_per_s > 0.0 {
            let cpu = match (&off.server, &on.server) {
                (Some(o), Some(l)) if o.cpu_us_per_request > 0.0 => format!(
                    ", {:.0} % of the node CPU per request",
                    100.0 * l.cpu_us_per_request / o.cpu_us_per_request
                ),
                _ => String::new(),
            };
            println!(
                "with the event log: {:.0} % of the throughput without it{cpu}",
                100.0 * on.requests_per_s / off.requests_per_s
            );
        }
    }
    if let (Some(b), Some(p)) = (find("beds"), pipeline) {
        if p.latency_us.p99 > 0 {
            println!(
                "p99 of beds is {:.2}× the pipeline's",
                b.latency_us.p99 as f64 / p.latency_us.p99 as f64
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(ms(1500), "1.50 ms");
    }

    #[test]
    fn this_process_is_measurable() {
        let s = sample(std::process::id()).expect("/proc readable");
        assert!(s.rss_kib > 0);
        let (busy, total) = machine().unwrap();
        assert!(busy <= total);
    }
}
