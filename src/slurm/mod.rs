//! Slurm: what the scheduler tells a job through its environment (`SLURM_JOB_ID`,
//! `SLURM_RESTART_COUNT`), the `scontrol`/`sbatch` calls the supervisor makes (job state,
//! KillWait, requeue or resubmit), and [`template`]: the self-resubmitting sbatch script.

use crate::storage::manifest::JobInfo;

pub mod template;

/// The Slurm job this process runs in, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    pub job_id: String,
    /// `SLURM_RESTART_COUNT`: unset on the first run of a job, then 1, 2, … after requeues.
    pub restart_count: u32,
}

impl JobEnv {
    /// Read `SLURM_JOB_ID` and `SLURM_RESTART_COUNT` from the environment.
    pub fn from_env() -> Option<JobEnv> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Option<JobEnv> {
        let job_id = get("SLURM_JOB_ID").filter(|s| !s.is_empty())?;
        let restart_count = get("SLURM_RESTART_COUNT")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Some(JobEnv {
            job_id,
            restart_count,
        })
    }

    pub fn job_info(&self) -> JobInfo {
        JobInfo {
            scheduler: "slurm".into(),
            id: self.job_id.clone(),
            restart_count: self.restart_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_job_and_restart_count() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(JobEnv::from_vars(env(&[])), None);
        let j = JobEnv::from_vars(env(&[("SLURM_JOB_ID", "42")])).unwrap();
        assert_eq!(j.restart_count, 0);
        let j = JobEnv::from_vars(env(&[("SLURM_JOB_ID", "42"), ("SLURM_RESTART_COUNT", "3")]))
            .unwrap();
        assert_eq!(j.job_info().restart_count, 3);
    }
}

/// What `scontrol show job` says of a job (the fields the supervisor needs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// `JobState`, e.g. RUNNING, CANCELLED, TIMEOUT, PREEMPTED, REQUEUED, PENDING.
    pub state: String,
    /// `Requeue=1`: the job may be requeued with `scontrol requeue`.
    pub requeueable: bool,
    /// `Command=`: the batch script's path (for resubmission).
    pub command: Option<String>,
    /// `Restarts=`.
    pub restarts: u32,
    /// `TimeLimit=`: None when UNLIMITED (or unparsable).
    pub time_limit: Option<std::time::Duration>,
    /// `RunTime=`: how long the job has run in this allocation, when the query was answered.
    pub run_time: Option<std::time::Duration>,
}

impl JobState {
    /// The time left before the job's time limit, as of the query.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        Some(self.time_limit?.saturating_sub(self.run_time?))
    }
}

/// A Slurm duration as `scontrol` prints it: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`. None for `UNLIMITED`, `NOT_SET`, `INVALID` or anything else.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = match (s.contains('-'), parts.as_slice()) {
        (false, [m]) => (0, *m, 0),
        (false, [m, sec]) => (0, *m, *sec),
        (true, [h]) => (*h, 0, 0),
        (true, [h, m]) => (*h, *m, 0),
        (_, [h, m, sec]) => (*h, *m, *sec),
        _ => return None,
    };
    Some(std::time::Duration::from_secs(
        ((days * 24 + h) * 60 + m) * 60 + sec,
    ))
}

/// Parse one-line `scontrol show job -o` output.
pub fn parse_show_job(text: &str) -> Option<JobState> {
    let mut st = JobState::default();
    let mut seen = false;
    for tok in text.split_whitespace() {
        let Some((k, v)) = tok.split_once('=') else {
            continue;
        };
        match k {
            "JobState" => {
                st.state = v.to_string();
                seen = true;
            }
            "Requeue" => st.requeueable = v == "1",
            "Command" => st.command = Some(v.to_string()).filter(|c| c != "(null)"),
            "Restarts" => st.restarts = v.parse().unwrap_or(0),
            "TimeLimit" => st.time_limit = parse_duration(v),
            "RunTime" => st.run_time = parse_duration(v),
            _ => {}
        }
    }
    seen.then_some(st)
}

/// `scontrol show job -o JOB`; None when scontrol is missing or says nothing usable.
pub fn show_job(job_id: &str) -> Option<JobState> {
    let out = std::process::Command::new("scontrol")
        .args(["show", "job", "-o", job_id])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_show_job(&String::from_utf8_lossy(&out.stdout))
}

/// How a job was put back in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeued {
    /// `scontrol requeue JOB`: same job id, back to PENDING.
    Scontrol,
    /// `sbatch --dependency=afterany:JOB SCRIPT`: a new job id.
    Resubmitted { new_job_id: String },
}

/// Put the job back in the queue: `scontrol requeue` when the job is requeueable, else
/// resubmit its batch script with an `afterany` dependency. The error says what to do by hand.
pub fn requeue(job_id: &str) -> Result<Requeued, String> {
    if which("scontrol").is_none() {
        return Err(
            "scontrol is not on PATH (inside a container?): resubmit the job by hand, or \
                    bind Slurm's commands into the container"
                .into(),
        );
    }
    let state = show_job(job_id);
    if state.as_ref().is_some_and(|s| s.requeueable) {
        let out = std::process::Command::new("scontrol")
            .args(["requeue", job_id])
            .output()
            .map_err(|e| format!("scontrol requeue {job_id}: {e}"))?;
        if out.status.success() {
            return Ok(Requeued::Scontrol);
        }
        tracing::warn!(
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "scontrol requeue failed; resubmitting with sbatch instead"
        );
    }
    let script = state.and_then(|s| s.command).ok_or_else(|| {
        format!("job {job_id} is not requeueable and its batch script is unknown")
    })?;
    let out = std::process::Command::new("sbatch")
        .args([
            "--parsable",
            &format!("--dependency=afterany:{job_id}"),
            &script,
        ])
        .output()
        .map_err(|e| format!("sbatch {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sbatch --dependency=afterany:{job_id} {script} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    Ok(Requeued::Resubmitted { new_job_id: id })
}

/// Slurm's `KillWait` (seconds between TERM and KILL), from `scontrol show config`.
pub fn kill_wait() -> Option<std::time::Duration> {
    let out = std::process::Command::new("scontrol")
        .args(["show", "config"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        if k.trim() != "KillWait" {
            return None;
        }
        v.split_whitespace()
            .next()?
            .parse()
            .ok()
            .map(std::time::Duration::from_secs)
    })
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|c| c.is_file())
    })
}

#[cfg(test)]
mod scontrol_tests {
    use super::*;

    #[test]
    fn parses_show_job() {
        let s =
            "JobId=15 JobName=x UserId=root(0) JobState=RUNNING Reason=None Requeue=1 Restarts=2 \
                 BatchFlag=1 Command=/tmp/a.sbatch WorkDir=/tmp";
        let j = parse_show_job(s).unwrap();
        assert_eq!(j.state, "RUNNING");
        assert!(j.requeueable);
        assert_eq!(j.restarts, 2);
        assert_eq!(j.command.as_deref(), Some("/tmp/a.sbatch"));
        assert_eq!(j.time_left(), None, "no TimeLimit/RunTime given");
        assert_eq!(
            parse_show_job("slurm_load_jobs error: Invalid job id"),
            None
        );
        let j = parse_show_job("JobId=15 JobState=RUNNING RunTime=00:01:10 TimeLimit=00:05:00")
            .unwrap();
        assert_eq!(j.time_left(), Some(std::time::Duration::from_secs(230)));
        let j = parse_show_job("JobId=15 JobState=RUNNING RunTime=00:01:10 TimeLimit=UNLIMITED")
            .unwrap();
        assert_eq!(j.time_left(), None);
    }

    #[test]
    fn parses_slurm_durations() {
        let d = |s| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(d("5"), Some(300));
        assert_eq!(d("5:30"), Some(330));
        assert_eq!(d("01:02:03"), Some(3723));
        assert_eq!(d("2-03"), Some(2 * 86400 + 3 * 3600));
        assert_eq!(d("2-03:04"), Some(2 * 86400 + 3 * 3600 + 240));
        assert_eq!(d("1-00:00:05"), Some(86405));
        for bad in ["UNLIMITED", "NOT_SET", "", "1:2:3:4", "a:b", "-5"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }
}
