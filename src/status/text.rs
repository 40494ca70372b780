//! The text rendering of a [`StatusReport`] for a person, one section at a time.

use serde_json::Value;

use super::*;
use crate::storage::retention::Mode;
use crate::supervision::history::Interruption;

/// Bytes in binary units, one decimal.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn human_age(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Render for a person, one section at a time.
pub fn render_text(r: &StatusReport) -> String {
    let mut o = String::new();
    render_summary(&mut o, r);
    render_checkpoints(&mut o, r);
    render_allocations(&mut o, r);
    render_goodput(&mut o, r);
    render_saves(&mut o, r);
    render_kept(&mut o, r);
    render_temp(&mut o, r);
    render_events(&mut o, r);
    if !r.warnings.is_empty() {
        o.push_str("\nWarnings:\n");
        for w in &r.warnings {
            o.push_str(&format!("  - {w}\n"));
        }
    }
    o
}

fn render_summary(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let _ = writeln!(o, "Run dir:      {}", r.run_dir);
    let state = serde_json::to_value(r.run.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_uppercase))
        .unwrap_or_default();
    let why = r.run.reason.as_ref().map(|x| format!(" — {x}"));
    let _ = writeln!(o, "Run:          {state}{}", why.unwrap_or_default());
    let resume = match (&r.resume_from, r.fell_back) {
        (Some(n), false) => format!("{n} (verified)"),
        (Some(n), true) => format!("{n} (verified; FALLBACK — the pointer's target is unusable)"),
        (None, _) if r.checkpoints.is_empty() => "none — a resume starts fresh".into(),
        (None, _) => "NONE VERIFIES — see warnings".into(),
    };
    let _ = writeln!(o, "Resume from:  {resume}");
    let pointer = serde_json::to_value(r.pointer.state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let names = r.pointer.names.as_ref().map(|n| format!(" ({n})"));
    let _ = writeln!(o, "Pointer:      {pointer}{}", names.unwrap_or_default());
    if let Some(b) = &r.best {
        let _ = writeln!(
            o,
            "Best:         {} = {} at {} (the weights of step {}; mode {})",
            b.metric,
            b.value,
            b.checkpoint,
            b.step,
            if b.mode == Mode::Min { "min" } else { "max" }
        );
    }
    let writer = match &r.writer {
        Some(h) => format!("running: {h}"),
        None => "none running".into(),
    };
    let _ = writeln!(o, "Writer:       {writer}");
    let _ = writeln!(
        o,
        "Disk:         checkpoints use {}; {} free of {}",
        human_bytes(r.disk.checkpoints_bytes),
        r.disk.free_bytes.map(human_bytes).unwrap_or("?".into()),
        r.disk.total_bytes.map(human_bytes).unwrap_or("?".into())
    );
}

fn render_checkpoints(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let _ = writeln!(o, "\nCheckpoints ({}):", r.checkpoints.len());
    if r.checkpoints.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "  {:<18} {:>6} {:>10} {:>7} {:>11}  {:<22} {:<20} STATE",
        "NAME", "EPOCH", "SIZE", "AGE", "JOB.RESTART", "METRICS", "KEPT AS"
    );
    for c in &r.checkpoints {
        let metrics = c
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect::<Vec<_>>()
            .join(",");
        let roles = c
            .roles
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok()?.as_str().map(String::from))
            .collect::<Vec<_>>()
            .join(",");
        let state = match c.verified {
            Some(true) => "verified",
            Some(false) => "CORRUPT",
            None => "manifest ok (use --verify)",
        };
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        let _ = writeln!(
            o,
            "  {:<18} {:>6} {:>10} {:>7} {:>11}  {:<22} {:<20} {state}",
            c.name,
            c.epoch.map(|e| e.to_string()).unwrap_or("-".into()),
            human_bytes(c.bytes),
            c.age_seconds.map(human_age).unwrap_or("?".into()),
            c.job
                .as_ref()
                .map(|j| format!("{}.{}", j.id, j.restart_count))
                .unwrap_or("-".into()),
            dash(metrics),
            dash(roles),
        );
        if let Some(w) = c.world_size {
            let per: Vec<String> = c
                .rank_bytes
                .iter()
                .enumerate()
                .map(|(r, b)| format!("rank {r} {}", human_bytes(*b)))
                .collect();
            let _ = writeln!(o, "    {w} ranks: {}", per.join(", "));
        }
    }
}

fn render_allocations(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.run.allocations.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nAllocations ({}):", r.run.allocations.len());
    let _ = writeln!(
        o,
        "  {:>3} {:>12} {:<10} {:>5} {:<20} {:<15} {:<12} {:>10} {:>7} {:>7}  {:<14} WHY",
        "#",
        "JOB.RESTART",
        "HOST",
        "RANKS",
        "STARTED",
        "ENDING",
        "INTERRUPTION",
        "SIG→CKPT",
        "REDONE",
        "LOST",
        "DECISION"
    );
    let cut = |s: Option<&str>, n: usize| s.unwrap_or("?").chars().take(n).collect::<String>();
    for (i, a) in r.run.allocations.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:>3} {:>12} {:<10} {:>5} {:<20} {:<15} {:<12} {:>10} {:>7} {:>7}  {:<14} {}",
            i + 1,
            format!("{}.{}", a.job_id.as_deref().unwrap_or("-"), a.restart_count),
            cut(a.host.as_deref(), 10),
            a.world_size.unwrap_or(1),
            cut(
                a.started_at
                    .map(|t| humantime::format_rfc3339_millis(t).to_string())
                    .as_deref(),
                19
            ),
            a.ending.as_deref().unwrap_or("(no word)"),
            match a.interruption {
                Some(Interruption::Announced) => "announced",
                Some(Interruption::Unannounced) => "UNANNOUNCED",
                None => "-",
            },
            a.signal_to_checkpoint_seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or("-".into()),
            a.steps_redone,
            a.steps_lost,
            a.decision.as_deref().unwrap_or("-"),
            a.reason.as_deref().unwrap_or("")
        );
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        for (rank, how) in &a.failed_ranks {
            let _ = writeln!(o, "      rank {rank} failed: {how}");
        }
        for i in &a.incomplete {
            let _ = writeln!(
                o,
                "      NOT committed{}: rank(s) {} never asked (rank(s) {} did)",
                i.step.map(|s| format!(" (step {s})")).unwrap_or_default(),
                list(&i.missing),
                list(&i.requested)
            );
        }
    }
}

/// The goodput section: where the allocations' time went, and the loss sparkline.
fn render_goodput(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let g = &r.run.goodput;
    if r.run.allocations.is_empty() {
        return;
    }
    let elapsed = g.elapsed_seconds;
    let pct = |x: f64| {
        if elapsed > 0.0 {
            format!("{:5.1}%", 100.0 * x / elapsed)
        } else {
            "    -".into()
        }
    };
    let _ = writeln!(
        o,
        "\nGoodput:      {} of allocation time ({:.1}s of {:.1}s became kept progress); \
         interruptions: {} announced, {} unannounced",
        g.goodput
            .map(|x| format!("{:.1}%", 100.0 * x))
            .unwrap_or("-".into()),
        g.productive_seconds,
        g.allocation_seconds,
        g.interruptions.announced,
        g.interruptions.unannounced
    );
    let _ = writeln!(
        o,
        "  {elapsed:.1}s elapsed (allocations and the waits between them):"
    );
    let b = &g.badput_seconds;
    let lost = format!("{} step(s) redone", g.lost_steps);
    for (name, secs, note) in [
        ("productive", g.productive_seconds, ""),
        ("start-up/restore", b.startup_restore, ""),
        ("save stall", b.save_stall, ""),
        ("lost work", b.lost_work, lost.as_str()),
        ("wait", b.wait, "between allocations"),
    ] {
        let line = format!("  {name:<17} {secs:>9.1}s {}  {note}", pct(secs));
        let _ = writeln!(o, "{}", line.trim_end());
    }
    if let Some(line) = &r.metrics.loss_sparkline {
        let _ = writeln!(
            o,
            "  loss {line} {}",
            r.metrics
                .last_loss
                .zip(r.metrics.last_step)
                .map(|(l, s)| format!("{l:.4} at step {s}"))
                .unwrap_or_default()
        );
    }
}

/// How saves are timed: the interval (auto) and the time-limit watch, each with why.
fn render_saves(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if let Some(i) = &r.saves.interval {
        let _ = writeln!(
            o,
            "Save interval: {:.0}s recommended, {:.0}s actual (at step {}) — {}",
            i.recommended_seconds, i.actual_seconds, i.step, i.reason
        );
    }
    if let Some(w) = &r.saves.time_limit_watch {
        let what = if w.fired {
            "it stopped the program for a last save (no warning signal came)"
        } else {
            "not needed so far"
        };
        let _ = writeln!(
            o,
            "Time limit:   {}s left at the allocation's start; the time-limit watch saves \
             {}s before it (after {}s): {what}",
            w.seconds_left, w.lead_seconds, w.save_in_seconds
        );
    }
}

fn render_kept(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.kept.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nKept staged files (NOT committed):");
    for k in &r.kept {
        let _ = writeln!(o, "  {}: {} — {}", k.dir, k.files.join(", "), k.reason);
        let _ = writeln!(o, "    commit them with: {}", k.commit_command);
    }
}

fn render_temp(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.temp_entries.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nTemp entries (in-progress or abandoned writes):");
    for t in &r.temp_entries {
        let _ = writeln!(o, "  {} ({})", t.name, human_bytes(t.bytes));
    }
}

fn render_events(o: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    if r.journal.last.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nRecent events ({} in journal):", r.journal.events);
    for e in &r.journal.last {
        let ts = e["ts"].as_str().unwrap_or("?");
        let ev = e["event"].as_str().unwrap_or("?");
        let mut rest: Vec<String> = e
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "ts" && *k != "event")
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect();
        rest.truncate(6);
        let _ = writeln!(o, "  {ts}  {ev:<22} {}", rest.join(" "));
    }
}

fn compact(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}
