//! Slurm: what the scheduler tells a job through its environment.
//!
//! Only reads the environment here; calls to `scontrol`/`sbatch` and template rendering belong
//! in this module too as they land.

use crate::storage::manifest::JobInfo;

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
