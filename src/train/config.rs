//! The built-in trainer's config: its types are the job config's ([`crate::config::trainer`],
//! parsed once with the rest of the file and built without torch); here only what needs torch.

pub use crate::config::trainer::{
    changed_keys, AdamConfig, CnnConfig, DataConfig, DeviceChoice, EvalConfig, GptConfig,
    LossScaleConfig, MlpConfig, MnistConfig, ModelConfig, OptimizerConfig, Pos, Precision,
    SchedulerConfig, SgdConfig, SyntheticConfig, SyntheticImagesConfig, TextConfig, TrainConfig,
};

impl Precision {
    /// The autocast dtype (`None`: no autocast).
    pub fn autocast_kind(self) -> Option<tch::Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(tch::Kind::BFloat16),
            Precision::Fp16 => Some(tch::Kind::Half),
        }
    }
}
